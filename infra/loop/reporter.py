"""What a run reports: train and eval records to `metrics.jsonl`, TensorBoard and the progress
bar, and the run's history (every record so far, as returned by `infra.train.run`)."""

from __future__ import annotations

import logging

from infra.errors import UserError
from infra.goodput import compute
from infra.metrics import MetricWriter, truncate_history
from infra.paths import PathLike
from infra.tasks import Task

log = logging.getLogger(__name__)


class Reporter:
    """One record per logged step. Only `enabled` (process 0) writes files and starts from the
    records already in `metrics.jsonl`; the others keep just this run's records.

    On a resumed run the records logged after `start_step` (by a run killed after its last
    checkpoint) are dropped first: those steps are trained and logged again. `start_step=None`:
    the run starts over, and no earlier record is kept.
    """

    def __init__(self, workdir: PathLike, task: Task, *, total_steps: int,
                 start_step: int | None, enabled: bool, progress_bar: bool):
        self.task = task
        self.history = truncate_history(workdir, start_step) if enabled else []
        self.writer = MetricWriter(workdir, total_steps=total_steps, start_step=start_step or 0,
                                   enabled=enabled, progress_bar=progress_bar)

    def has_eval(self, step: int) -> bool:
        """Whether the history already holds an evaluation of `step`."""
        return any(r["step"] == step and any(k.startswith("eval/") for k in r)
                   for r in self.history)

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        unit = self.task.unit
        self.history.append(self.writer.write(step, {f"train/{k}": v for k, v in metrics.items()}))
        self.writer.progress(step, {"loss": f"{metrics['loss']:.3f}",
                                    f"{unit}/s": f"{metrics[f'{unit}_per_sec']:,.0f}"})

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append(self.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()}))
        self.writer.progress(step, {f"eval {k}": f"{metrics[k]:.4g}"
                                    for k in self.task.headline_metrics if k in metrics})
        self.writer.flush()  # evaluations are rare and worth seeing in TensorBoard at once

    def log_goodput(self, step: int, workdir: PathLike) -> None:
        """The workdir's goodput so far (`infra.goodput`) to TensorBoard (not to the JSONL: the
        metrics history stays the same however often a run was interrupted)."""
        if self.writer.tb is None:
            return

        try:
            report = compute(workdir)
        except UserError as e:  # an event log edited by hand must not fail a finished run
            log.warning("warning: no goodput for TensorBoard: %s", e)
            return
        self.writer.write_tensorboard(step, {
            "goodput/goodput": report["goodput"], "goodput/productive_s": report["productive_s"],
            "goodput/wall_s": report["wall_s"],
            **{f"goodput/badput_s/{k}": v for k, v in report["badput_s"].items()}})

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
