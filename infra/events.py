"""The run's event log: what happened, when, across restarts of the same workdir.

`<workdir>/events/process_<i>.jsonl`, one JSON object per line, appended by process `i` of every
run in the workdir: `{"time": <unix s>, "event": "<name>", "process": i, "run": <id>, ...}`. It
is what later tells how a workdir's history unfolded: which checkpoints were once committed (so
a run that finds none left knows they were lost, not never written) and where the time went
(`infra.goodput`). Writes happen in the calling thread: on a disk every event is flushed as it
is recorded; in a bucket the log is rewritten every few seconds and at once for the events that
matter when a run dies (`DURABLE`). A failed write stops the run like any other. A run refused
at start-up writes no event (`EventLog.accept`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable

from infra import paths
from infra.errors import UserError
from infra.jsonout import dumps
from infra.metrics import write_failure
from infra.paths import PathLike

EVENTS_DIR = "events"
DURABLE = ("start", "restore", "checkpoint_committed", "exit")
log = logging.getLogger(__name__)


class EventLog:
    """Appends this process's events to `<workdir>/events/process_<index>.jsonl`.

    `defer`: nothing is written before `accept()`. A training run defers until it is accepted
    (config, data and checkpoint known to be good): its events wait in memory, so a refused run
    leaves the workdir as it was. A run that stops before acceptance for another reason
    (preempted, interrupted) accepts them on its way out: its start-up is part of the workdir's
    history."""

    def __init__(self, workdir: PathLike, process_index: int = 0, *, defer: bool = False):
        self.directory = paths.path(workdir) / EVENTS_DIR
        self.process = process_index
        self.run = f"{os.getpid()}-{time.time():.6f}"  # tells runs apart whatever their clocks
        self.path = self.directory / f"process_{process_index}.jsonl"
        self._pending: list[tuple[str, bool]] | None = []
        self._file = None
        if not defer:
            self.accept()

    @property
    def accepted(self) -> bool:
        return self._pending is None

    def accept(self) -> None:
        """Open the log and write the events recorded so far; later ones are written as they
        come."""
        if self._pending is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = paths.AppendFile(self.path)
        except OSError as e:
            raise write_failure(self.path, e) from None
        pending, self._pending = self._pending, None
        for line, flush in pending:
            self._write(line, flush)

    def record(self, event: str, *, at: float | None = None, **fields) -> None:
        """Append `event` (with `fields`) as of now, or as of unix time `at`."""
        line = dumps({"time": time.time() if at is None else at, "event": event,
                      "process": self.process, "run": self.run, **fields})
        if self._pending is not None:
            self._pending.append((line, event in DURABLE))
        else:
            self._write(line, event in DURABLE)

    def _write(self, line: str, flush: bool) -> None:
        try:
            self._file.write(line + "\n", flush=flush)
        except OSError as e:
            raise write_failure(self.path, e) from None

    def close(self) -> None:
        """Close the log; events never accepted are dropped."""
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass


def read_event_files(workdir: PathLike, usable: Callable[[dict], bool] | None = None
                     ) -> tuple[list[dict], dict[str, int]]:
    """(every process's events, oldest first; {file: records skipped}). A record is kept only
    if it is a JSON object with an event name and a finite time that `usable` accepts: a line
    torn by a crash or edited by hand is skipped. UserError naming a file that cannot be read."""
    events, skipped = [], {}
    directory = paths.path(workdir) / EVENTS_DIR
    for path in sorted(directory.glob("process_*.jsonl")) if directory.is_dir() else ():
        try:
            lines = paths.read_text(path).splitlines()
        except OSError as e:
            raise UserError(f"cannot read the event log {path}: {e.strerror or e}; move it out "
                            f"of {directory} (runs append their events there)") from None
        good = [r for r in map(_record, lines) if r is not None and (usable is None or usable(r))]
        skipped[str(path)] = sum(1 for line in lines if line.strip()) - len(good)
        events += good
    return sorted(events, key=lambda e: e["time"]), skipped


def _record(line: str) -> dict | None:
    """The event on `line`, or None where it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    t = record.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or (
            isinstance(t, float) and not math.isfinite(t)):
        return None
    return record


def warn_skipped(skipped: dict[str, int]) -> None:
    """One warning line per event file with skipped records."""
    for path, count in skipped.items():
        if count:
            log.warning("warning: skipped %d unusable record%s in %s", count,
                        "" if count == 1 else "s", path)


def read_events(workdir: PathLike) -> list[dict]:
    """Every process's events, oldest first; records that cannot be used (a line torn by a
    crash) are skipped with a warning (`read_event_files`)."""
    events, skipped = read_event_files(workdir)
    warn_skipped(skipped)
    return events


def committed_checkpoints(workdir: PathLike) -> list[int]:
    """Steps whose checkpoints the event log saw committed, in any run of this workdir."""
    return sorted({int(e["step"]) for e in read_events(workdir)
                   if e.get("event") == "checkpoint_committed" and isinstance(e.get("step"), int)})
