"""`python -m infra plot <workdir> [<workdir> ...] [--out loss.png] [--metric loss]`: loss
curves (or another logged metric's, e.g. an RL run's `reward`) as one PNG.

Two panels: loss against step, and loss against data seen (tokens = step × train.batch_size ×
data.seq_len for the LM task, examples = step × train.batch_size otherwise, from each workdir's
`config.json`). Train loss is drawn solid, eval loss dashed with markers, one colour per run.
Imports no JAX: matplotlib draws with its Agg canvas (no display needed). Like `generate` and
`eval`, it only reads the workdirs: the PNG goes to `--out` (default `loss.png` in the current
directory), never into a run's workdir.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

from infra import config as config_lib
from infra import paths
from infra.errors import UserError, output_error
from infra.metrics import METRICS_FILE, read_history

DEFAULT_NAME = "loss.png"


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def units_per_step(config: dict) -> tuple[int, str]:
    """(how many units one step consumes, unit name): tokens for the LM task, else examples.
    Values that are missing or not positive integers count as 1 (steps are still plotted)."""
    section = lambda name: config.get(name) if isinstance(config.get(name), dict) else {}  # noqa: E731
    batch = _positive_int(section("train").get("batch_size")) or 1
    seq_len = _positive_int(section("data").get("seq_len"))
    if config.get("task", "lm") == "lm" and seq_len:
        return batch * seq_len, "tokens"
    return batch, "examples"


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, last record per step wins, non-finite values dropped."""
    by_step = {}
    for record in history:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _read_run(workdir: str | Path, metric: str = "loss") -> dict:
    workdir = paths.path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir '{workdir}' does not exist; pass the workdir of a training run")
    if not (workdir / METRICS_FILE).is_file():
        raise UserError(f"no {METRICS_FILE} in '{workdir}'; pass the workdir of a training run "
                        f"that has logged at least one step")
    try:
        history = read_history(workdir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {workdir / METRICS_FILE} ({type(e).__name__}); "
                        f"it is not the JSONL a training run writes") from None
    train, evals = _series(history, f"train/{metric}"), _series(history, f"eval/{metric}")
    if not train[0] and not evals[0]:
        raise UserError(f"{workdir / METRICS_FILE} holds no finite train/{metric} or "
                        f"eval/{metric} yet; train longer or pass another workdir")
    per_step, unit = units_per_step(config_lib.read_saved(workdir))
    return {"workdir": workdir, "train": train, "eval": evals, "per_step": per_step, "unit": unit}


def _labels(workdirs: list[Path]) -> list[str]:
    """Workdir names, or the paths as given where two runs share a name."""
    names = [w.name or str(w) for w in workdirs]
    return [n if names.count(n) == 1 else str(w) for n, w in zip(names, workdirs)]


def plot_runs(workdirs, out: str | Path | None = None, metric: str = "loss") -> Path:
    """Draw the `metric` (train/ and eval/) curves of every workdir into one PNG; returns its
    path.

    `out` defaults to `loss.png` in the current directory. Raises `UserError` for a workdir without
    `metrics.jsonl` (or without any loss recorded).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display

    workdirs = [paths.path(w) for w in workdirs]
    if not workdirs:
        raise UserError("plot needs at least one workdir")
    runs = [_read_run(w, metric) for w in workdirs]
    out = paths.path(out if out is not None else DEFAULT_NAME)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got '{out}'")

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_step, ax_data = fig.subplots(1, 2, sharey=True)
    colors = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    for i, (run, label) in enumerate(zip(runs, _labels(workdirs))):
        color = colors[i % len(colors)]
        for ax, scale in ((ax_step, 1), (ax_data, run["per_step"])):
            steps, values = run["train"]
            if steps:
                ax.plot([s * scale for s in steps], values, "-", color=color, lw=1.6,
                        label=f"{label} train")
            steps, values = run["eval"]
            if steps:
                ax.plot([s * scale for s in steps], values, "--o", color=color, lw=1.2, ms=4,
                        label=f"{label} eval")
    units = sorted({r["unit"] for r in runs})
    from matplotlib.ticker import EngFormatter

    ax_data.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1.5M, 3G tokens
    ax_step.set_xlabel("step")
    ax_data.set_xlabel(f"{' / '.join(units)} seen")
    ax_step.set_ylabel(metric)
    ax_step.set_title(f"{metric} vs step")
    ax_data.set_title(f"{metric} vs {' / '.join(units)} seen")
    for ax in (ax_step, ax_data):
        ax.grid(True, alpha=0.3)
    ax_data.legend(fontsize="small", loc="upper right")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=110)
        out.write_bytes(image.getvalue())  # a local file or an object in a bucket
    except OSError as e:  # a full disk exits 3, like every command's output
        raise output_error(out, e, "--out") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdirs", nargs="+", metavar="workdir", help="training workdirs to overlay")
    p.add_argument("--out", default=None,
                   help=f"PNG to write (default: {DEFAULT_NAME} in the current directory)")
    p.add_argument("--metric", default="loss",
                   help="the logged metric to draw (train/<metric>, eval/<metric>), e.g. reward")


def run_cli(args) -> int:
    print(plot_runs(args.workdirs, args.out, args.metric))
    return 0
