"""scripts/workloads.py builds its Markdown table from a run's metrics.jsonl (fake runs here, no
training) and keeps the rows it did not rerun."""

import importlib.util
import json
import sys

import pytest

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("workloads", ROOT / "scripts" / "workloads.py")
workloads = sys.modules["workloads"] = importlib.util.module_from_spec(spec)  # for its dataclass
spec.loader.exec_module(workloads)

BY_NAME = {w.experiment: w for w in workloads.WORKLOADS}
MACHINE = "2-core x86_64, jax 0.10.2"


def fake_metrics(tmp_path, *records) -> object:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def row(tmp_path, experiment, *records, wall_s=400.0, loads=(1.5, 3.3)):
    return workloads.build_row(BY_NAME[experiment], fake_metrics(tmp_path, *records), wall_s,
                               list(loads), "2026-11-29", MACHINE)


def test_readme_workloads_are_all_listed():
    readme = (ROOT / "README.md").read_text()
    for w in workloads.WORKLOADS:
        assert f"| `{w.experiment}`" in readme, w.experiment


def test_readme_quotes_the_generated_table():
    """Every result and wall time the README gives is the row scripts/workloads.py wrote into
    docs/workloads.md (its tolerance: none; rerun the script, then copy the row)."""
    readme = (ROOT / "README.md").read_text()
    rows = workloads.read_rows(ROOT / "docs" / "workloads.md")
    assert set(rows) == {f"`{w.experiment}`" for w in workloads.WORKLOADS}
    for experiment, cells in rows.items():
        (line,) = [l for l in readme.splitlines() if l.startswith(f"| {experiment}")]
        result, throughput, wall = cells[2], cells[3], cells[4]
        assert f"| {result} | {wall} |" in line, (line, result, wall)
    tiny = rows["`lm.py:tiny`"]
    intro = readme[readme.index("What the tiny run did"):readme.index("## Workloads")]
    first, last = tiny[2].replace("**", "").split(" → ")
    assert f"**{first} → {last}**" in intro and f"**{tiny[3]}**" in intro, intro
    assert tiny[4] in intro and tiny[5] in intro, intro


def test_language_model_row_shows_first_and_last_eval_loss(tmp_path):
    cells = row(tmp_path, "lm.py:tiny",
                {"step": 0, "eval/loss": 5.9621},
                {"step": 50, "train/loss": 3.0, "train/tokens_per_sec": 4000.0, "train/flops_per_sec_per_device": 1e11},
                {"step": 100, "train/loss": 2.5, "train/tokens_per_sec": 4300.0},
                {"step": 150, "train/loss": 2.2, "train/tokens_per_sec": 4200.0},
                {"step": 400, "eval/loss": 1.7851})
    assert cells == ("`lm.py:tiny`", "eval loss (nats/byte), first → last", "5.962 → **1.785**",
                     "4,200 tokens/s", "6 min 40 s", "1.5–3.3", "2026-11-29", MACHINE)


def test_vision_ctr_and_forecast_rows(tmp_path):
    vit = row(tmp_path, "vit.py", {"step": 0, "eval/accuracy": 0.1}, {"step": 2000, "eval/accuracy": 0.98050139},
              wall_s=57.4)
    assert vit[2:5] == ("**98.05%**", "—", "57 s")
    ctr = row(tmp_path, "dlrm.py", {"step": 1000, "eval/auc": 0.78812, "eval/bayes_auc": 0.79314,
                                     "eval/auc_gap": 0.00502, "eval/logloss": 0.45481,
                                     "eval/bayes_logloss": 0.45003, "train/examples_per_sec": 9e4})
    assert ctr[2] == "**0.7881** (Bayes 0.7931, gap 0.0050); log-loss 0.4548 (Bayes 0.4500)"
    co2 = row(tmp_path, "forecast.py:co2", {"step": 300, "eval/mase": 0.2749, "eval/mae": 0.4702,
                                             "eval/naive_mae": 1.7127})
    assert co2[2] == "**0.275** (MAE 0.470 ppm, naive 1.713)"
    macro = row(tmp_path, "forecast.py:macro", {"step": 100, "eval/mase": 0.517, "eval/mae": 1.0,
                                                 "eval/naive_mae": 2.0, "eval/mase/realgdp": 0.4141,
                                                 "eval/mase/realcons": 0.351, "eval/mase/realinv": 0.7861})
    assert macro[2] == "**0.517** (realgdp 0.414, realcons 0.351, realinv 0.786)"


def test_a_run_without_evaluations_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no eval records"):
        row(tmp_path, "vit.py", {"step": 10, "train/loss": 1.0})


def test_only_replaces_its_rows_and_keeps_the_table_in_readme_order(tmp_path):
    out = tmp_path / "workloads.md"
    old = {"`vit.py`": row(tmp_path, "vit.py", {"step": 1, "eval/accuracy": 0.9}),
           "`lm.py:tiny`": row(tmp_path, "lm.py:tiny", {"step": 1, "eval/loss": 2.0})}
    out.write_text(workloads.document(workloads.merge({}, old)))
    assert workloads.read_rows(out) == old
    new = row(tmp_path, "vit.py", {"step": 1, "eval/accuracy": 0.95})
    rows = workloads.merge(workloads.read_rows(out), {new[0]: new})
    assert [r[0] for r in rows] == ["`lm.py:tiny`", "`vit.py`"] and rows[1] == new
    text = workloads.document(rows)
    assert "python scripts/workloads.py" in text
    assert "**95.00%**" in text and "**90.00%**" not in text
