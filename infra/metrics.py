"""Where metrics go: `<workdir>/metrics.jsonl`, TensorBoard event files and a progress bar.

Metric names are `train/<name>` and `eval/<name>`; each JSONL line is one logged step:
`{"step": 200, "train/loss": 2.31, ...}`. Only process 0 writes. Every write happens in the
calling thread: a failure (full disk, quota, too many open files) is raised where the loop can
stop with one line, never left to a background thread that dies and blocks the loop.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from infra import paths
from infra.errors import CheckpointError, write_fix
from infra.event_file import EventFileWriter
from infra.paths import PathLike

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def _record(line: str) -> dict | None:
    """One JSONL line as a metrics record, or None when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(
            record.get("step"), bool):
        return None
    return record


def read_history(workdir: PathLike) -> list[dict]:
    """Every record in `<workdir>/metrics.jsonl` (empty when there is none). A line that is not
    a record with an integer `step` (the last one torn by a crash mid-write, or an edited file)
    is skipped with a warning."""
    path = paths.path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(paths.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            log.warning("warning: skipping line %d of %s: not a metrics record (%s)", number, path,
                        line[:60] + ("..." if len(line) > 60 else ""))
            continue
        records.append(record)
    return records


def truncate_history(workdir: PathLike, last_step: int | None) -> list[dict]:
    """Keep the records up to `last_step` (a run killed after its last checkpoint logged later
    ones; the resumed run logs those steps again), or none when `last_step` is None (a run that
    starts over). Returns the records kept; the file is rewritten clean."""
    records = [r for r in read_history(workdir)
               if last_step is not None and r["step"] <= last_step]
    path = paths.path(workdir) / METRICS_FILE
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _clean(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_failure(path: PathLike, e: OSError) -> CheckpointError:
    """The one-line error for a failed write into the workdir, with the fix that fits it."""
    return CheckpointError(f"cannot write {path}: {e.strerror or e}; {write_fix(e)} (earlier "
                           f"checkpoints are intact)")


class _EventFile:
    """A TensorBoard event file written synchronously (`infra.event_file`). In a bucket the
    file is written locally and uploaded whole at each flush."""

    def __init__(self, logdir: PathLike):
        self.remote = paths.path(logdir) if paths.is_remote(logdir) else None
        local = Path(tempfile.mkdtemp(prefix="infra-tb-")) if self.remote else Path(logdir)
        local.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(local)
        self._local = self._writer.path
        self.path = self.remote / self._local.name if self.remote else self._local

    def add_scalars(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self._writer.flush()
        if self.remote is not None:
            paths.write_remote(self.path, self._local.read_bytes())

    def close(self) -> None:
        self.flush()
        self._writer.close()


class MetricWriter:
    """Appends metrics to JSONL and TensorBoard, and drives the progress bar."""

    FLUSH_SECS = 10.0  # TensorBoard sees new scalars at least this often

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.postfix: dict[str, str] = {}
        self._flushed = time.monotonic()
        if not enabled:
            return
        path = paths.path(workdir) / METRICS_FILE
        try:
            self.jsonl = paths.AppendFile(path)
            self.tb = _EventFile(paths.path(workdir) / "tensorboard")
        except OSError as e:
            raise write_failure(path, e) from None
        if progress_bar:
            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                dynamic_ncols=True, disable=None,  # disabled when stderr is not a terminal
            )

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        """Record one step's metrics everywhere; returns the JSON record."""
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if self.enabled:
            try:
                self.jsonl.write(json.dumps(record) + "\n")
            except OSError as e:
                raise write_failure(self.jsonl.name, e) from None
            try:
                self.tb.add_scalars(step, {k: float(v) for k, v in metrics.items()})
            except OSError as e:
                raise write_failure(self.tb.path, e) from None
            if time.monotonic() - self._flushed > self.FLUSH_SECS:
                self.flush()
        return record

    def write_tensorboard(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars for TensorBoard only, flushed now."""
        if self.tb is None:
            return
        try:
            self.tb.add_scalars(step, metrics)
        except OSError as e:
            raise write_failure(self.tb.path, e) from None
        self.flush()

    def progress(self, step: int, summary: dict[str, str]) -> None:
        """Advance the bar; where stderr is not a terminal (logs, CI), print one line instead."""
        if self.bar is None:
            return
        if self.bar.disable:
            fields = "  ".join(f"{k} {v}" for k, v in summary.items())
            print(f"step {step}/{self.total_steps}  {fields}", file=sys.stderr, flush=True)
            return
        self.postfix |= summary  # train fields and the latest eval fields side by side
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(self.postfix, refresh=True)

    def flush(self) -> None:
        """Make TensorBoard's file complete on disk now."""
        if self.tb is not None:
            try:
                self.tb.flush()
                self.jsonl.flush()
            except OSError as e:
                raise write_failure(self.tb.path, e) from None
            self._flushed = time.monotonic()

    def close(self) -> None:
        """Close everything; a full disk here must not mask the error that ended the run."""
        if self.bar is not None:
            self.bar.close()
        for handle in (self.tb, self.jsonl):
            try:
                if handle is not None:
                    handle.close()
            except OSError:
                pass
