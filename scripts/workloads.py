#!/usr/bin/env python
"""Train every workload of README's Workloads table once and write the table (docs/workloads.md).

    python scripts/workloads.py [--only vit.py:convnet ...] [--out docs/workloads.md]

Each row is one run of the real CLI, `python -m infra train --config experiments/<exp> --workdir
<tmp>`, on 1 CPU device; its result is read from the run's `metrics.jsonl` (held-out metrics at
the first and last evaluation) and its wall time is the whole command's (start-up, compilation
and evaluations included). Other processes slow the wall time but not the metric, so the 1-minute
load average is sampled every few seconds during each run and printed next to it. With `--only`
the other rows of an existing `--out` are kept, so each row says its own date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "workloads.md"
LOAD_POLL_S = 5.0

Record = dict[str, float]


# ----------------------------------------------------------------------------- what a row shows


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _lm(first: Record, last: Record) -> str:
    return f"{first['eval/loss']:.3f} → **{last['eval/loss']:.3f}**"


def _accuracy(first: Record, last: Record) -> str:
    return f"**{_pct(last['eval/accuracy'])}**"


def _ctr(first: Record, last: Record) -> str:
    return (f"**{last['eval/auc']:.4f}** (Bayes {last['eval/bayes_auc']:.4f}, gap "
            f"{last['eval/auc_gap']:.4f}); log-loss {last['eval/logloss']:.4f} "
            f"(Bayes {last['eval/bayes_logloss']:.4f})")


def _forecast(unit: str) -> Callable[[Record, Record], str]:
    def show(first: Record, last: Record) -> str:
        per_target = {k.split("/", 2)[2]: v for k, v in last.items() if k.startswith("eval/mase/")}
        if per_target:
            detail = ", ".join(f"{name} {v:.3f}" for name, v in per_target.items())
        else:
            detail = f"MAE {last['eval/mae']:.3f}{unit}, naive {last['eval/naive_mae']:.3f}"
        return f"**{last['eval/mase']:.3f}** ({detail})"
    return show


@dataclass(frozen=True)
class Workload:
    experiment: str  # as README names it: `<file>[:<variant>]` under experiments/
    metric: str
    show: Callable[[Record, Record], str]  # (first eval record, last eval record) -> result cell


WORKLOADS = [
    Workload("lm.py:tiny", "eval loss (nats/byte), first → last", _lm),
    Workload("vit.py", "top-1 accuracy", _accuracy),
    Workload("vit.py:convnet", "top-1 accuracy", _accuracy),
    Workload("dlrm.py", "AUC (Bayes-optimal AUC of the true probabilities)", _ctr),
    Workload("forecast.py:co2", "MASE vs seasonal-naive", _forecast(" ppm")),
    Workload("forecast.py:sunspots", "MASE vs seasonal-naive", _forecast("")),
    Workload("forecast.py:macro", "MASE, mean over targets", _forecast("")),
]
HEADER = ("experiment", "metric on held-out data", "result", "train throughput", "wall time",
          "load average", "date", "machine")


# ----------------------------------------------------------------------------- reading a run


def read_records(metrics_jsonl: Path) -> list[Record]:
    return [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]


def eval_records(records: list[Record]) -> list[Record]:
    """The records that carry held-out metrics, in step order."""
    return sorted((r for r in records if any(k.startswith("eval/") for k in r)),
                  key=lambda r: r["step"])


def throughput(records: list[Record]) -> str:
    """Median of the logged training throughput (`train/<unit>_per_sec`), e.g. '4,210 tokens/s'."""
    keys = {k for r in records for k in r
            if k.startswith("train/") and k.endswith("_per_sec") and "flops" not in k}
    if len(keys) != 1:
        return "—"
    (key,) = keys
    values = sorted(r[key] for r in records if key in r)
    unit = key.removeprefix("train/").removesuffix("_per_sec")
    return f"{values[len(values) // 2]:,.0f} {unit}/s"


def fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def machine() -> str:
    from importlib.metadata import version

    return f"{os.cpu_count()}-core {platform.machine()}, jax {version('jax')}"


def build_row(workload: Workload, metrics_jsonl: Path, wall_s: float, loads: list[float],
              date: str, machine_name: str) -> tuple[str, ...]:
    """One table row from a finished run's metrics.jsonl and how the run went."""
    records = read_records(metrics_jsonl)
    evals = eval_records(records)
    if not evals:
        raise ValueError(f"{metrics_jsonl} has no eval records")
    load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—"
    return (f"`{workload.experiment}`", workload.metric, workload.show(evals[0], evals[-1]),
            throughput(records), fmt_duration(wall_s), load, date, machine_name)


# ----------------------------------------------------------------------------- the document


def render(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def document(rows: list[tuple[str, ...]]) -> str:
    return f"""# Workloads

Written by `python scripts/workloads.py` (rerun it to regenerate; `--only <experiment>` reruns
one row and keeps the others). Each row is one run of
`python -m infra train --config experiments/<experiment> --workdir <tmp>` on 1 CPU device:

- **result**: the held-out metric at the run's last evaluation, from its `metrics.jsonl`;
- **train throughput**: the median of the throughput the run logged while training;
- **wall time**: the whole command, start-up, compilation and evaluations included;
- **load average**: the machine's 1-minute load average, sampled every {LOAD_POLL_S:.0f} s during
  the run (min–max). Other processes slow the throughput and the wall time, not the result.

{render(rows)}
"""


def read_rows(path: Path) -> dict[str, tuple[str, ...]]:
    """The rows of an existing table, by experiment cell (to keep the ones not rerun)."""
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        cells = tuple(c.strip() for c in line.strip().strip("|").split("|"))
        if line.startswith("| `") and len(cells) == len(HEADER):
            rows[cells[0]] = cells
    return rows


def merge(old: dict[str, tuple[str, ...]], new: dict[str, tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Rows in WORKLOADS order, the new ones replacing the old."""
    rows = {**old, **new}
    return [rows[k] for k in (f"`{w.experiment}`" for w in WORKLOADS) if k in rows]


# ----------------------------------------------------------------------------- running


def run(workload: Workload, workdir: Path) -> tuple[float, list[float]]:
    """Train `workload` through the CLI on 1 CPU device: (wall seconds, load averages seen)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", INFRA_CPU_DEVICES="1")
    cmd = [sys.executable, "-m", "infra", "train", "--config", f"experiments/{workload.experiment}",
           "--workdir", str(workdir)]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    loads = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                proc.wait(timeout=LOAD_POLL_S)
                break
            except subprocess.TimeoutExpired:
                loads.append(os.getloadavg()[0])
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = (workdir.parent / f"{workdir.name}.log").read_text()[-2000:]
        raise SystemExit(f"{workload.experiment} failed (exit {proc.returncode}):\n{tail}")
    return wall, loads


def parse_args(argv=None) -> argparse.Namespace:
    names = [w.experiment for w in WORKLOADS]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=names, metavar="EXP",
                   help=f"run only this experiment (repeatable): {', '.join(names)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown file to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = [w for w in WORKLOADS if not args.only or w.experiment in args.only]
    name = machine()
    new = {}
    with tempfile.TemporaryDirectory(prefix="infra-workloads-") as tmp:
        for w in chosen:
            workdir = Path(tmp) / w.experiment.replace(":", "-").replace(".py", "")
            wall, loads = run(w, workdir)
            date = datetime.date.today().isoformat()
            row = build_row(w, workdir / "metrics.jsonl", wall, loads, date, name)
            new[row[0]] = row
            print(render([row]).splitlines()[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document(merge(read_rows(args.out), new)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
