"""A training run's workdir: a path Orbax can use, writable, and owned by one run at a time.

`claim(workdir)` is what a training run does before touching anything in it:
* refuses paths with glob characters (`[ ] * ?`): Orbax lists a checkpoint's files with a glob
  over the unescaped path (etils.epath), so such a checkpoint saves but never restores;
* creates the directory and checks it is writable;
* takes an exclusive lock (`<workdir>/.lock`) held until the run ends: a second trainer on the
  same workdir stops with one line and touches nothing of the first. On a disk it is a `flock`,
  which the kernel drops when the process dies; in a bucket a lease its holder refreshes
  (`_Lease`), taken over once nobody refreshed it for a while. In a multi-process run process 0
  holds it for the whole run; the others learn the outcome from it. Read-only commands
  (`generate`, `eval`, `plot`) never take it.

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
import socket
import threading
import time
from collections.abc import Callable

from infra import paths
from infra.checkpoint import layout
from infra.errors import UserError
from infra.events import EVENTS_DIR, committed_checkpoints
from infra.metrics import METRICS_FILE, read_history
from infra.paths import Path, PathLike

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)
GLOB_CHARACTERS = "[]*?"


def check_path(workdir: PathLike) -> Path:
    """UserError unless Orbax can save and restore checkpoints under `workdir`."""
    path = paths.path(workdir)
    full = str(path if paths.is_remote(path) else path.absolute())
    bad = sorted({c for c in full if c in GLOB_CHARACTERS})
    if bad:
        raise UserError(f"workdir '{full}' contains {' '.join(repr(c) for c in bad)}: Orbax reads "
                        f"such paths as glob patterns and could not restore its checkpoints; "
                        f"choose a --workdir without [ ] * ?")
    return path


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _describe(owner_json: str) -> str:
    try:
        who = json.loads(owner_json or "{}")
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _in_use(path, who: str) -> UserError:
    return UserError(f"workdir '{path}' is in use by another training run ({who}); wait for it "
                     f"to finish or choose another --workdir")


class FileLock:
    """`flock` on `file`, which records the holder (pid, host, since); the kernel drops the lock
    when the holder dies. `busy(holder)` is the UserError when another process holds it."""

    def __init__(self, file: Path, busy: Callable[[str], UserError]):
        self._handle = open(file, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._handle.seek(0)
            owner = self._handle.read().strip()
            self._handle.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock '{file}' ({e.strerror}); use a filesystem that "
                                "supports file locks") from None
            raise busy(_describe(owner)) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(_owner()))
        self._handle.flush()

    def release(self) -> None:
        self._handle.close()


def _lease_expiry(value: str | None, default: float) -> float:
    """`INFRA_LEASE_EXPIRY_S` as seconds (unset or empty: `default`); UserError if it is not a
    number of seconds of at least 2 (the heartbeat needs a share of it)."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 2.0 or seconds == float("inf"):
        raise UserError(f"INFRA_LEASE_EXPIRY_S must be a number of seconds >= 2, got {value!r}; "
                        "unset it for the default 35 s")
    return seconds


class _Lease:
    """A bucket has no file locks: `<workdir>/.lock` is a lease that its holder rewrites every
    `HEARTBEAT_S` (a thread). A lease nobody refreshed for `EXPIRY_S` belongs to a run that died
    (SIGKILL, a lost VM): the claim waits that long, then takes it over; a lease that moves
    means a live run, and the claim is refused. A run that ends deletes its lease.
    `INFRA_LEASE_EXPIRY_S` sets the expiry (the heartbeat keeps its share of it): a shorter one
    takes over a dead run's workdir sooner, but a run paused longer than it loses its lease."""

    HEARTBEAT_S, EXPIRY_S = 10.0, 35.0

    def __init__(self, path: Path, clock=time.monotonic, sleep=time.sleep):
        expiry = _lease_expiry(os.environ.get("INFRA_LEASE_EXPIRY_S"), self.EXPIRY_S)
        self.EXPIRY_S, self.HEARTBEAT_S = expiry, expiry * self.HEARTBEAT_S / self.EXPIRY_S
        self.file, self._stop = path / LOCK_FILE, threading.Event()
        self._mine = json.dumps({**_owner(), "lease": os.urandom(8).hex()})
        if self.file.exists():
            seen, deadline = self.file.read_text(), clock() + self.EXPIRY_S
            while clock() < deadline:
                sleep(1.0)
                if not self.file.exists():
                    break  # released meanwhile
                if self.file.read_text() != seen:
                    raise _in_use(path, _describe(seen))
        self.file.write_text(self._mine)
        sleep(1.0)  # two runs that claimed at once: the last write wins, the other stops
        if self.file.read_text() != self._mine:
            raise _in_use(path, _describe(self.file.read_text()))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="infra-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self._mine = json.dumps({**json.loads(self._mine), "beat": time.time()})
                paths.write_remote(self.file, self._mine.encode())
            except OSError as e:  # the run itself will fail on the same bucket soon
                log.warning("warning: cannot refresh the workdir lease %s: %s", self.file, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not paths.answering(self.file):
            return  # the bucket is down: the lease expires by itself
        try:
            if self.file.read_text() == self._mine:
                self.file.unlink()
        except Exception:  # noqa: BLE001 - the bucket may be gone; the lease then expires
            pass


class Claim:
    """This run's hold on its workdir (see the module docstring)."""

    def __init__(self, path: Path, created: bool, lock):
        self.path, self.created, self._lock = path, created, lock

    def release(self) -> None:
        """Unlock; remove the workdir if this run created it and wrote no file into it (its lock
        and event log aside)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self.created or not paths.answering(self.path):
            return
        try:
            written = [p for p in paths.files(self.path) if p.name != LOCK_FILE
                       and EVENTS_DIR not in p.relative_to(self.path).parts[:1]]
            if not written:
                self.path.rmtree(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - tidying up must not mask how the run ended
            log.warning("warning: could not tidy up %s: %s", self.path, e)


def claim(workdir: PathLike, *, lock: bool = True) -> Claim:
    """Create (if needed), check and lock `workdir` for one training run (UserError if another
    run holds it, or the location cannot be written: a missing bucket, no credentials). `lock=False`:
    processes other than 0 of a multi-process run."""
    path = check_path(workdir)
    paths.check_credentials(path)
    try:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError locally; a bucket's client raises its own
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
        fix = ("check that the bucket exists and that credentials are set up (gcloud auth "
               "application-default login, or GOOGLE_APPLICATION_CREDENTIALS)"
               if paths.is_remote(path) else "choose another --workdir")
        raise UserError(f"workdir '{path}' is not writable ({why}); {fix}") from None
    if not lock:
        return Claim(path, created, None)
    return Claim(path, created, _Lease(path) if paths.is_remote(path)
                 else FileLock(path / LOCK_FILE, lambda who: _in_use(path, who)))


def check_fresh_start(workdir: PathLike) -> None:
    """Before a run starts over from step 0 in a workdir without a checkpoint: refuse (UserError)
    when that would silently throw away progress, i.e. the workdir holds checkpoints moved aside
    as corrupt, or metrics beyond step 0 of a run that had committed checkpoints since lost.
    Metrics of a run that stopped before its first checkpoint are expected: a warning."""
    path = paths.path(workdir)
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
