"""Where metrics go: `<workdir>/metrics.jsonl`, TensorBoard event files and a progress bar.

Metric names are `train/<name>` and `eval/<name>`; each JSONL line is one logged step:
`{"step": 200, "train/loss": 2.31, ...}`. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from infra.errors import CheckpointError

METRICS_FILE = "metrics.jsonl"


def read_history(workdir: str | Path) -> list[dict]:
    """Every record in `<workdir>/metrics.jsonl` (empty when there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_history(workdir: str | Path, last_step: int) -> list[dict]:
    """Drop records logged after `last_step` (a run killed after its last checkpoint logged them;
    the resumed run logs those steps again). Returns the records kept."""
    records = [r for r in read_history(workdir) if r["step"] <= last_step]
    path = Path(workdir) / METRICS_FILE
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _clean(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    """Appends metrics to JSONL and TensorBoard, and drives the progress bar."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.postfix: dict[str, str] = {}
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(Path(workdir) / METRICS_FILE, "a")
        self.tb = SummaryWriter(logdir=str(Path(workdir) / "tensorboard"), flush_secs=10)
        if progress_bar:
            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                dynamic_ncols=True, disable=None,  # disabled when stderr is not a terminal
            )

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        """Record one step's metrics everywhere; returns the JSON record."""
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if self.enabled:
            try:
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()
            except OSError as e:
                raise CheckpointError(
                    f"cannot write metrics to {self.jsonl.name}: {e.strerror}; free disk space or "
                    f"use another --workdir (earlier checkpoints are intact)"
                ) from None
            for name, value in metrics.items():
                self.tb.add_scalar(name, float(value), global_step=step)
        return record

    def progress(self, step: int, summary: dict[str, str]) -> None:
        """Advance the bar; where stderr is not a terminal (logs, CI), print one line instead."""
        if self.bar is None:
            return
        if self.bar.disable:
            fields = "  ".join(f"{k} {v}" for k, v in summary.items())
            print(f"step {step}/{self.total_steps}  {fields}", file=sys.stderr, flush=True)
            return
        self.postfix |= summary  # train fields and the latest eval fields side by side
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(self.postfix, refresh=True)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Close everything; a full disk here must not mask the error that ended the run."""
        if self.bar is not None:
            self.bar.close()
        for handle in (self.tb, self.jsonl):
            try:
                if handle is not None:
                    handle.close()
            except OSError:
                pass
