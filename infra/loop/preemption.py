"""Preemption: SIGTERM (what TPU VMs and Kubernetes send) ends the run at a step boundary with a
committed checkpoint, exit 75; the next run of the same command resumes."""

from __future__ import annotations

import signal
import threading

import jax

from infra.errors import Preempted


class SigtermFlag:
    """Single-process preemption: SIGTERM sets `raised`, which the loop reads between steps.

    Multi-process runs leave SIGTERM to JAX's preemption service, which makes every process
    agree on the step to stop at (`Checkpointer.reached_preemption`).
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self) -> "SigtermFlag":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stopped(checkpointer, step: int) -> Preempted:
    """Wait until the checkpoint of `step` has committed; the exception that ends the run."""
    checkpointer.wait()
    return Preempted(f"stopped at step {step} on SIGTERM; checkpoint written to "
                     f"{checkpointer.directory / str(step)}; run the same command to resume")
