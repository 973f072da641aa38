"""Preemption: SIGTERM (what TPU VMs and Kubernetes send) ends the run at a step boundary with a
committed checkpoint, exit 75; the next run of the same command resumes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

import jax

from infra.errors import Preempted

EXIT_TERMINATED = 128 + signal.SIGTERM


class SigtermFlag:
    """Single-process preemption: SIGTERM sets `raised`, which the loop reads between steps.

    The stop is bounded: if the process is still running `grace_s` seconds after the first
    SIGTERM (the loop is stuck in a hung write, say), or when a second SIGTERM arrives, it exits
    at once with code 143 and one line; checkpoints committed before are intact.

    Multi-process runs leave SIGTERM to JAX's preemption service, which makes every process
    agree on the step to stop at (`Checkpointer.reached_preemption`).
    """

    def __init__(self, grace_s: float = 120.0, exit: Callable[[int], None] = os._exit):
        self.raised = False
        self.grace_s = grace_s
        self._exit = exit
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "SigtermFlag":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:
            self._give_up("a second SIGTERM arrived")
            return
        self.raised = True
        self._timer = threading.Timer(self.grace_s, self._give_up,
                                      (f"still running {self.grace_s:g} s after SIGTERM",))
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self, why: str) -> None:
        print(f"error: {why}; exiting without a final checkpoint (the last committed one is "
              f"intact; run the same command to resume)", file=sys.stderr, flush=True)
        self._exit(EXIT_TERMINATED)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._timer is not None:
            self._timer.cancel()


def stop_during_start_up() -> None:
    """Until the loop takes over (`SigtermFlag`), SIGTERM ends the process cleanly: a
    `Preempted` raised where the main thread is (exit 75; nothing was trained, nothing is lost)."""

    def handle(signum, frame):
        raise Preempted("stopped on SIGTERM before training began; nothing to save; run the "
                        "same command to resume")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)


def stopped(checkpointer, step: int) -> Preempted:
    """Wait until the checkpoint of `step` has committed; the exception that ends the run."""
    checkpointer.wait()
    return Preempted(f"stopped at step {step} on SIGTERM; checkpoint written to "
                     f"{checkpointer.directory / str(step)}; run the same command to resume")
