"""The task's evaluation metrics over a fixed list of held-out batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax

from infra import host_malloc
from infra.tasks import Task


class Evaluator:
    """`evaluator(params) -> {metric: value}`: `eval_step` on every batch, then
    `Task.summarize_eval` over all outputs on the host (exact AUC, MASE, masked accuracy)."""

    def __init__(self, task: Task, eval_step: Callable, batches: Sequence[dict], events=None):
        self.task, self.eval_step, self.batches = task, eval_step, list(batches)
        self.events = events  # `infra.events.EventLog`: each evaluation's duration (goodput)

    def __call__(self, params) -> dict[str, float]:
        t0 = time.perf_counter()
        outputs, pending = [], None
        for batch in self.batches:  # at most two in flight: each holds its own scratch memory
            out = self.eval_step(params, batch)
            if pending is not None:
                outputs.append(jax.device_get(pending))
            pending = out
        if pending is not None:
            outputs.append(jax.device_get(pending))
        host_malloc.release()
        metrics = self.task.summarize_eval(outputs)
        if self.events is not None:
            self.events.record("eval", seconds=time.perf_counter() - t0)
        return metrics
