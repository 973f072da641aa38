"""A training run's workdir: a path Orbax can use, writable, and owned by one run at a time.

`claim(workdir)` is what a training run does before touching anything in it:
* refuses paths with glob characters (`[ ] * ?`): Orbax lists a checkpoint's files with a glob
  over the unescaped path (etils.epath), so such a checkpoint saves but never restores;
* creates the directory and checks it is writable;
* takes an exclusive lock (`<workdir>/.lock`, `flock`) held until the run ends: a second trainer
  on the same workdir stops at once with one line and touches nothing of the first. In a
  multi-process run process 0 holds it for the whole run; the others learn the outcome from it.
  The kernel drops the lock when the process dies, so a killed run never leaves it stale.
  Read-only commands (`generate`, `eval`, `plot`) never take it.

`Claim.release()` unlocks, and removes a workdir that this run created if the run wrote nothing
into it (bad input leaves no empty workdir behind). `check_fresh_start` refuses to start over
from step 0 where that would silently throw progress away.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from infra.errors import UserError

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)
GLOB_CHARACTERS = "[]*?"


def check_path(workdir: str | Path) -> Path:
    """UserError unless Orbax can save and restore checkpoints under `workdir`."""
    path = Path(workdir).expanduser()
    full = str(path.absolute())
    bad = sorted({c for c in full if c in GLOB_CHARACTERS})
    if bad:
        raise UserError(f"workdir '{full}' contains {' '.join(repr(c) for c in bad)}: Orbax reads "
                        f"such paths as glob patterns and could not restore its checkpoints; "
                        f"choose a --workdir without [ ] * ?")
    return path


class Claim:
    """This run's hold on its workdir (see the module docstring)."""

    def __init__(self, path: Path, created: bool, handle):
        self.path, self.created, self._handle = path, created, handle

    def release(self) -> None:
        """Unlock; remove the workdir if this run created it and wrote no file into it (its lock
        and event log aside)."""
        from infra.events import EVENTS_DIR

        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.created:
            written = [p for p in self.path.rglob("*") if p.is_file() and p.name != LOCK_FILE
                       and EVENTS_DIR not in p.relative_to(self.path).parts[:1]]
            if not written:
                shutil.rmtree(self.path, ignore_errors=True)


def claim(workdir: str | Path, *, lock: bool = True) -> Claim:
    """Create (if needed), check and lock `workdir` for one training run (UserError if another
    run holds it). `lock=False`: processes other than 0 of a multi-process run."""
    path = check_path(workdir)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir '{path}' is not writable ({e.strerror}); choose another "
                        f"--workdir") from None
    if not lock:
        return Claim(path, created, None)
    handle = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()
            raise UserError(f"cannot lock workdir '{path}' ({e.strerror}); choose a --workdir on "
                            f"a filesystem that supports file locks") from None
        handle.seek(0)
        owner = handle.read().strip() or "{}"
        handle.close()
        try:
            who = json.loads(owner)
            who = f"pid {who['pid']} on {who['host']}, since {who['since']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise UserError(f"workdir '{path}' is in use by another training run ({who}); wait for "
                        f"it to finish or choose another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    handle.flush()
    return Claim(path, created, handle)


def check_fresh_start(workdir: str | Path) -> None:
    """Before a run starts over from step 0 in a workdir without a checkpoint: refuse (UserError)
    when that would silently throw away progress, i.e. the workdir holds checkpoints moved aside
    as corrupt, or metrics beyond step 0 of a run that had committed checkpoints since lost.
    Metrics of a run that stopped before its first checkpoint are expected: a warning."""
    from infra.checkpoint import layout
    from infra.events import committed_checkpoints
    from infra.metrics import METRICS_FILE, read_history

    path = Path(workdir)
    aside = layout.moved_aside(path)
    if aside:
        raise UserError(
            f"'{path}' has no intact checkpoint but {len(aside)} moved aside as corrupt "
            f"({', '.join(p.name for p in aside)}); rather than start over from step 0, this run "
            f"stops: inspect them, then move them out of {layout.checkpoints_dir(path)} to start "
            f"over (or use a new --workdir)")
    last = max((r["step"] for r in read_history(path)), default=0)
    if last <= 0:
        return
    lost = committed_checkpoints(path)
    if lost:
        raise UserError(
            f"'{path}' has no checkpoint, but its runs logged metrics up to step {last} and "
            f"committed checkpoints (last: step {lost[-1]}) that are gone; rather than start "
            f"over from step 0, this run stops: restore the checkpoints, or move {METRICS_FILE} "
            f"and events/ out of the workdir to start over (or use a new --workdir)")
    log.warning("warning: the previous run in %s logged up to step %d but stopped before its "
                "first checkpoint; starting over from step 0", path, last)
