"""The run's event log: what happened, when, across restarts of the same workdir.

`<workdir>/events/process_<i>.jsonl`, one JSON object per line, appended by process `i` of every
run in the workdir: `{"time": <unix s>, "event": "<name>", "process": i, "run": <id>, ...}`. It
is what later tells how a workdir's history unfolded: which checkpoints were once committed (so
a run that finds none left knows they were lost, not never written) and where the time went
(`infra.goodput`). Writes happen in the calling thread: on a disk every event is flushed as it
is recorded; in a bucket the log is rewritten every few seconds and at once for the events that
matter when a run dies (`DURABLE`). A failed write stops the run like any other.
"""

from __future__ import annotations

import json
import logging
import os
import time

from infra import paths
from infra.metrics import write_failure
from infra.paths import PathLike

EVENTS_DIR = "events"
DURABLE = ("start", "restore", "checkpoint_committed", "exit")
log = logging.getLogger(__name__)


class EventLog:
    """Appends this process's events to `<workdir>/events/process_<index>.jsonl`."""

    def __init__(self, workdir: PathLike, process_index: int = 0):
        directory = paths.path(workdir) / EVENTS_DIR
        self.process = process_index
        self.run = f"{os.getpid()}-{time.time():.6f}"  # tells runs apart whatever their clocks
        self.path = directory / f"process_{process_index}.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = paths.AppendFile(self.path)
        except OSError as e:
            raise write_failure(self.path, e) from None

    def record(self, event: str, *, at: float | None = None, **fields) -> None:
        """Append `event` (with `fields`) as of now, or as of unix time `at`."""
        line = json.dumps({"time": time.time() if at is None else at, "event": event,
                           "process": self.process, "run": self.run, **fields})
        try:
            self._file.write(line + "\n", flush=event in DURABLE)
        except OSError as e:
            raise write_failure(self.path, e) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def read_events(workdir: PathLike) -> list[dict]:
    """Every process's events, oldest first; a line torn by a crash is skipped."""
    events = []
    directory = paths.path(workdir) / EVENTS_DIR
    for path in sorted(directory.glob("process_*.jsonl")) if directory.exists() else ():
        for line in paths.read_text(path).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("time"), (int, float)):
                events.append(record)
    return sorted(events, key=lambda e: e["time"])


def committed_checkpoints(workdir: PathLike) -> list[int]:
    """Steps whose checkpoints the event log saw committed, in any run of this workdir."""
    return sorted({int(e["step"]) for e in read_events(workdir)
                   if e.get("event") == "checkpoint_committed" and isinstance(e.get("step"), int)})
