"""Shared test utilities: run the real CLI in a subprocess; a data position to checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path = ROOT,
        **kwargs) -> subprocess.CompletedProcess:
    """`python -m infra <args>` with 8 emulated CPU devices (in `cwd`, default the repository);
    returns the finished process."""
    full_env = {**os.environ, "INFRA_CPU_DEVICES": "8", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "infra", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "INFRA_CPU_DEVICES": "8", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "infra", *args],
        cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, poll: float = 0.02) -> None:
    """Wait until `predicate()` holds, failing (with the process's output) if `proc` ends or
    `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def kill_when(predicate, proc: subprocess.Popen, timeout: float = 240,
              poll: float = 0.02) -> None:
    """SIGKILL `proc` as soon as `predicate()` holds (`wait_for`), and reap it."""
    wait_for(predicate, proc, timeout, poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_metric_everywhere(workdir: Path, stderr: str, name: str) -> None:
    """Eval metric `name` is in metrics.jsonl, equal in TensorBoard's event files (read with
    tensorboard's own loader) and shown in the progress output (one line per update off a tty)."""
    import json

    import pytest
    from tensorboard.backend.event_processing import event_accumulator

    tag = f"eval/{name}"
    jsonl = {r["step"]: r[tag] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if tag in r}
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars(tag)}
    assert jsonl and tb.keys() == jsonl.keys(), (tag, tb, jsonl)
    assert all(tb[s] == pytest.approx(v, rel=1e-6) for s, v in jsonl.items()), (tb, jsonl)
    assert f"eval {name} " in stderr, stderr


class Position:
    """A data iterator's checkpointable position: the grain protocol `Checkpointer` saves and
    restores beside the state."""

    def __init__(self, index: int = 0):
        self.state = {"next_index": index}

    def get_state(self) -> dict:
        return self.state

    def set_state(self, state: dict) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of `directory` but `leave` bytes; returns the filler file."""
    import os

    st = os.statvfs(directory)
    filler = directory / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler
