"""A `jax.profiler` trace of steps `(first, last)` (`profile.steps`), for TensorBoard / XProf."""

from __future__ import annotations

import tempfile
from typing import Any

import jax

from infra import paths


class ProfilerWindow:
    """Starts the trace before step `first` runs and stops it once step `last` has finished.
    A trace for a workdir in a bucket is written locally, then copied next to the run."""

    def __init__(self, steps: tuple[int, int] | tuple[()], logdir: paths.PathLike):
        self.steps = tuple(steps)
        self.logdir = logdir
        self._local = None

    def before(self, step: int) -> None:
        """Called before running step `step + 1` (`step` steps are done)."""
        if self.steps and step + 1 == self.steps[0]:
            remote = paths.is_remote(self.logdir)
            self._local = tempfile.mkdtemp(prefix="infra-profile-") if remote else str(self.logdir)
            jax.profiler.start_trace(self._local)

    def after(self, step: int, outputs: Any) -> None:
        """Called once step `step` was dispatched; `outputs` are its results."""
        if self.steps and step == self.steps[1]:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            if paths.is_remote(self.logdir):
                paths.upload_tree(self._local, paths.path(self.logdir))
