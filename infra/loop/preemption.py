"""Preemption: SIGTERM (what TPU VMs and Kubernetes send) ends the run at a step boundary with a
committed checkpoint, exit 75; the next run of the same command resumes.

The handler only sets a flag: raising from a signal handler lands wherever the main thread
happens to be, and code there that handles exceptions can swallow it. The loop reads the flag
between steps; a SIGTERM during start-up is therefore honoured after the first step, and one
during shutdown lets the run finish. Either way the stop is bounded: `grace_s` after the first
SIGTERM, or at a second one, the process exits at once with code 143 and one line (checkpoints
committed before are intact).

Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as usual; but an exception raised while the
main thread runs a garbage-collector callback (JAX registers one) is discarded by Python, so
the handler also leaves a mark that the loop checks between steps (`raise_if_interrupted`):
an interrupt is never lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from infra.errors import Preempted

EXIT_TERMINATED = 128 + signal.SIGTERM


class SigtermFlag:
    """`raised` once SIGTERM arrived (after `install`)."""

    def __init__(self, grace_s: float = 120.0, exit: Callable[[int], None] = os._exit):
        self.raised = False
        self.grace_s = grace_s
        self._exit = exit
        self._previous = None
        self._timer: threading.Timer | None = None

    def install(self) -> "SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._timer is not None:
            self._timer.cancel()

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

    # the context-manager form: installed for a block only
    def __enter__(self) -> "SigtermFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


_process_flag: SigtermFlag | None = None
_interrupted = False


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def catch_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt and is remembered (the CLI does this first thing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a Ctrl-C arrived whose exception Python discarded."""
    if _interrupted:
        raise KeyboardInterrupt


def catch_sigterm(grace_s: float = 120.0) -> SigtermFlag:
    """Handle SIGTERM for the whole life of the process (the CLI does this first thing)."""
    global _process_flag
    if _process_flag is None:
        _process_flag = SigtermFlag(grace_s).install()
    return _process_flag


@contextlib.contextmanager
def sigterm_flag(grace_s: float) -> Iterator[SigtermFlag]:
    """The flag the training loop reads: the process's own (so a SIGTERM during start-up
    counts) or, where nobody installed one (a notebook), one installed for the loop only.
    Multi-process runs get a flag that never rises: there JAX's preemption service handles
    SIGTERM and every process stops at the same agreed step."""
    import jax

    if jax.process_count() > 1:
        yield SigtermFlag(grace_s)
    elif _process_flag is not None:
        _process_flag.grace_s = grace_s
        yield _process_flag
    else:
        with SigtermFlag(grace_s) as flag:
            yield flag


def stopped(checkpointer, step: int) -> Preempted:
    """Wait until the checkpoint of `step` has committed; the exception that ends the run."""
    checkpointer.wait()
    return Preempted(f"stopped at step {step} on SIGTERM; checkpoint written to "
                     f"{checkpointer.directory / str(step)}; run the same command to resume")
