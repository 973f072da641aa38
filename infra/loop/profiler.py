"""A `jax.profiler` trace of steps `(first, last)` (`profile.steps`), for TensorBoard / XProf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


class ProfilerWindow:
    """Starts the trace before step `first` runs and stops it once step `last` has finished."""

    def __init__(self, steps: tuple[int, int] | tuple[()], logdir: str | Path):
        self.steps = tuple(steps)
        self.logdir = str(logdir)

    def before(self, step: int) -> None:
        """Called before running step `step + 1` (`step` steps are done)."""
        if self.steps and step + 1 == self.steps[0]:
            jax.profiler.start_trace(self.logdir)

    def after(self, step: int, outputs: Any) -> None:
        """Called once step `step` was dispatched; `outputs` are its results."""
        if self.steps and step == self.steps[1]:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
