"""Shared test utilities: run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m infra <args>` with 8 emulated CPU devices; returns the finished process."""
    full_env = {**os.environ, "INFRA_CPU_DEVICES": "8", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "infra", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "INFRA_CPU_DEVICES": "8", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "infra", *args],
        cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
