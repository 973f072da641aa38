"""The run's event log: what happened, when, across restarts of the same workdir.

`<workdir>/events/process_<i>.jsonl`, one JSON object per line, appended by process `i` of every
run in the workdir: `{"time": <unix s>, "event": "<name>", ...}`. It is what later tells how a
workdir's history unfolded (e.g. which checkpoints were once committed, so a run that finds none
left knows they were lost, not never written). Writes are synchronous and flushed: an event
that returned is on disk, and a full disk stops the run like any other write.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from infra.metrics import write_failure

EVENTS_DIR = "events"
log = logging.getLogger(__name__)


class EventLog:
    """Appends this process's events to `<workdir>/events/process_<index>.jsonl`."""

    def __init__(self, workdir: str | Path, process_index: int = 0):
        directory = Path(workdir) / EVENTS_DIR
        self.process = process_index
        self.run = f"{os.getpid()}-{time.time():.6f}"  # tells runs apart whatever their clocks
        self.path = directory / f"process_{process_index}.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        except OSError as e:
            raise write_failure(self.path, e) from None

    def record(self, event: str, *, at: float | None = None, **fields) -> None:
        """Append `event` (with `fields`) as of now, or as of unix time `at`."""
        line = json.dumps({"time": time.time() if at is None else at, "event": event,
                           "process": self.process, "run": self.run, **fields})
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:
            raise write_failure(self.path, e) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def read_events(workdir: str | Path) -> list[dict]:
    """Every process's events, oldest first; a line torn by a crash is skipped."""
    events = []
    for path in sorted((Path(workdir) / EVENTS_DIR).glob("process_*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("time"), (int, float)):
                events.append(record)
    return sorted(events, key=lambda e: e["time"])


def committed_checkpoints(workdir: str | Path) -> list[int]:
    """Steps whose checkpoints the event log saw committed, in any run of this workdir."""
    return sorted({int(e["step"]) for e in read_events(workdir)
                   if e.get("event") == "checkpoint_committed" and isinstance(e.get("step"), int)})
