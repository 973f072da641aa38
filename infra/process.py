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
  Ctrl-C that Python discarded (raised again by the loop: `infra.loop.preemption`).
"""

from __future__ import annotations

import logging
import sys
import time

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
        # traceback; `infra.loop.preemption` remembers it and raises it again between steps.
        if not (_is_closed_loop(info.exc_value) or isinstance(info.exc_value, KeyboardInterrupt)):
            default_unraisable(info)

    sys.unraisablehook = unraisable
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def start_time() -> float:
    """When goodput's `start_up` begins (unix seconds): for the CLI, when this program's code
    started (infra was first imported: the interpreter's own start, tens of ms, is not counted,
    and neither is what the process ran before it `exec`ed Python, a shell or a `pip install`);
    for a library caller (a notebook, which may call `train.run` hours after importing), now."""
    return _IMPORTED_AT if "cli" in _done else time.time()
