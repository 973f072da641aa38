"""The newest intact checkpoint: the one loop that resuming (`Checkpointer.restore_latest`) and
every read-only reader (`restore_params`) share.

Steps are tried newest first. A read that fails is judged by `verify.diagnose`: files proven
damaged (`Corrupt`) go to the caller's `on_corrupt` (resuming moves them aside or stops; a
reader skips them) and the next older step is tried; a failure of the environment
(`Unreadable`) stops the search, naming the step, since it says nothing about the files; any
other error is a bug and propagates. A reader may watch a run that is still training: a step
that its `replaced` callback says was superseded meanwhile is tried again without judgement.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from infra.checkpoint.verify import Corrupt, Unreadable, diagnose
from infra.errors import UserError

T = TypeVar("T")


class UnreadableStep(Exception):
    """`Unreadable`, with the step whose read failed."""

    def __init__(self, step: int, cause: Unreadable):
        super().__init__(str(cause))
        self.step = step


def newest_intact(steps: Callable[[], list[int]], attempt: Callable[[int], T], *,
                  step_dir: Callable[[int], Path],
                  on_corrupt: Callable[[int, Corrupt], None],
                  replaced: Callable[[int], bool] = lambda step: False) -> tuple[int, T] | None:
    """(step, `attempt(step)`) of the newest of `steps()` whose read succeeds, None when every
    step failed as corrupt (or there is none). `steps()` is listed again before each try."""
    tried: set[int] = set()
    while True:
        candidates = [s for s in reversed(steps()) if s not in tried]
        if not candidates:
            return None
        step = candidates[0]
        tried.add(step)
        try:
            return step, attempt(step)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a read failure is classified; others propagate
            if replaced(step):
                continue  # superseded by a newer commit, or deleted: list the steps again
            # a Corrupt raised by a check is judged too: a file that cannot be opened is no damage
            meaning = e if isinstance(e, Unreadable) else diagnose(e, step_dir(step))
            if meaning is None:
                raise
            if isinstance(meaning, Unreadable):
                raise UnreadableStep(step, meaning) from None
            on_corrupt(step, meaning)
