"""Where a run's checkpoints live in its workdir: the one place that knows the on-disk layout.

    <workdir>/checkpoints/<step>/state/        params, optimizer state, step, rng (tensorstore)
                                 data/         the grain iterator position, JSON, one per process
                                 meta/metadata JSON: step, config, versions, process count
                                 fingerprint/  a checksum of every state array (JSON)

Orbax writes each step into a temporary directory and renames it to `<step>` once complete, so
a directory named by its step number holds a committed checkpoint; unfinished saves and
checkpoints moved aside as corrupt (`corrupt-<step>-<time>`) have other names.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE, DATA, META, FINGERPRINT = "state", "data", "meta", "fingerprint"


def checkpoints_dir(workdir: str | Path) -> Path:
    return Path(workdir) / CHECKPOINTS


def step_dir(workdir: str | Path, step: int) -> Path:
    return checkpoints_dir(workdir) / str(step)


def committed_steps(workdir: str | Path) -> list[int]:
    """Steps of the committed checkpoints in `<workdir>/checkpoints`, oldest first."""
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / STATE).is_dir() and (p / META).is_dir())


def moved_aside(workdir: str | Path) -> list[Path]:
    """Checkpoints moved aside as corrupt (`corrupt-<step>-<time>`), oldest first."""
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith("corrupt-"))


def read_meta(path: Path) -> dict:
    """The JSON metadata of the checkpoint in step directory `path` (OSError / ValueError when
    it cannot be read)."""
    return json.loads((Path(path) / META / "metadata").read_text())
