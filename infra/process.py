"""Process-wide set-up, made once by whoever owns the process: the CLI, or `infra.train.run`
(for notebooks). Importing `infra` changes nothing process-wide.

`setup()`:
* glibc malloc settings that keep XLA:CPU's per-step scratch memory mapped (`infra.host_malloc`;
  CPU runs only, and best before JAX starts its threads);
* drops Orbax's notice, at every async save, that all transfers run in the background (they do
  by design here: `infra.checkpoint.orbax_handlers`).

`setup(cli=True)` also, for a process whose errors the CLI reports as one line:
* log format and levels (infra's INFO messages, libraries' warnings), Orbax's absl logging
  silenced (it logs its background failures with tracebacks);
* drops the "Event loop is closed" tracebacks that tensorstore's C++ threads print through
  `sys.excepthook` / `sys.unraisablehook` after a failed async save, and the traceback of a
  Ctrl-C that Python discarded (raised again by the loop: `raise_if_interrupted`).

Signals, also the process owner's (the CLI catches both first thing; `train` and `serve` read
them): SIGTERM (what TPU VMs and Kubernetes send) only raises a flag (`catch_sigterm`,
`SigtermFlag`): raising from a signal handler lands wherever the main thread happens to be, and
code there that handles exceptions can swallow it. Whoever owns the work reads the flag at a
safe point (the training loop between steps: `infra.loop.preemption`; `serve` drains). The stop
is bounded: `grace_s` after the first SIGTERM, or at a second one, the process exits at once
with code 143 and one line (checkpoints committed before are intact).

Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as usual; but an exception raised while the
main thread runs a garbage-collector callback (JAX registers one) is discarded by Python, so
the handler also leaves a mark that the loop checks between steps (`raise_if_interrupted`):
an interrupt is never lost.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from infra import host_malloc

_IMPORTED_AT = time.time()

_done: set[str] = set()
_BACKGROUND_NOTICE = "No prioritized params found for saving"


def _not_the_background_notice(record: logging.LogRecord) -> bool:
    return _BACKGROUND_NOTICE not in record.getMessage()


def setup(*, cli: bool = False) -> None:
    """Apply the process-wide settings (idempotent)."""
    if "library" not in _done:
        host_malloc.configure()
        logging.getLogger("absl").addFilter(_not_the_background_notice)
        _done.add("library")
    if cli and "cli" not in _done:
        _ignore_closed_loop_callbacks()
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("infra").setLevel(logging.INFO)
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.FATAL)
        except ImportError:
            pass
        _done.add("cli")


def _is_closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _from_interrupt(value: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an exception raised while handling one (a finaliser that a
    Ctrl-C stopped half-way, and whose clean-up then failed)."""
    seen = set()
    while value is not None and id(value) not in seen:
        if isinstance(value, KeyboardInterrupt):
            return True
        seen.add(id(value))
        value = value.__cause__ or value.__context__
    return False


def _ignore_closed_loop_callbacks() -> None:
    """After a failed async save, tensorstore's threads still call back into Orbax's closed
    event loop; each call would print a traceback that carries no information (the failure
    itself is reported as one line)."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if not _is_closed_loop(value):
            default(kind, value, tb)

    sys.excepthook = hook
    default_unraisable = sys.unraisablehook

    def unraisable(info):
        # A Ctrl-C that landed in a garbage-collector callback is discarded by Python with a
        # traceback; `catch_sigint` remembers it and the loop raises it again between steps.
        if not (_is_closed_loop(info.exc_value) or _from_interrupt(info.exc_value)):
            default_unraisable(info)

    sys.unraisablehook = unraisable
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def start_time() -> float:
    """When goodput's `start_up` begins (unix seconds): for the CLI, when this program's code
    started (infra was first imported: the interpreter's own start, tens of ms, is not counted,
    and neither is what the process ran before it `exec`ed Python, a shell or a `pip install`);
    for a library caller (a notebook, which may call `train.run` hours after importing), now."""
    return _IMPORTED_AT if "cli" in _done else time.time()


def say_last(line: str) -> None:
    """Print the line a failed or stopped run ends with and silence stderr after it. In a
    multi-process run the distributed runtime's threads keep logging (a lost peer's gRPC
    "Socket closed") until the process exits: stderr goes to /dev/null *before* the line is
    written to a saved copy of it, so that no such line can land after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(terminal, (line + "\n").encode())


# --------------------------------------------------------------------------- signals
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


_sigterm: SigtermFlag | None = None
_interrupted = False


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def catch_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt and is remembered (the CLI does this first thing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def interrupted() -> bool:
    """A Ctrl-C arrived (after `catch_sigint`)."""
    return _interrupted


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a Ctrl-C arrived whose exception Python discarded."""
    if _interrupted:
        raise KeyboardInterrupt


def import_jax() -> None:
    """Import JAX with SIGINT and SIGTERM held until the import is done. A Ctrl-C whose
    KeyboardInterrupt lands while one of JAX's compiled extensions initialises aborts the
    process (SIGABRT, no message); held, the signal arrives right after the import and is an
    ordinary interrupt (exit 130) or preemption. Call it before anything imports JAX."""
    if "jax" in sys.modules or threading.current_thread() is not threading.main_thread():
        import jax  # noqa: F401
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        import jax  # noqa: F401
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):  # delivered again, now to the usual handlers
            signal.raise_signal(s)


def catch_sigterm(grace_s: float = 120.0) -> SigtermFlag:
    """Handle SIGTERM for the whole life of the process (the CLI does this first thing)."""
    global _sigterm
    if _sigterm is None:
        _sigterm = SigtermFlag(grace_s).install()
    return _sigterm


def sigterm_caught() -> SigtermFlag | None:
    """The process's own SIGTERM flag, if `catch_sigterm` installed one."""
    return _sigterm
