"""Where a run's checkpoints live in its workdir: the one place that knows the on-disk layout.

    <workdir>/checkpoints/<step>/state/        params, optimizer state, step, rng (tensorstore)
                                 data/         the grain iterator position, JSON, one per process
                                 meta/metadata JSON: step, config, versions, process count
                                 fingerprint/  a checksum of every state array (JSON)

On a disk Orbax writes each step into a temporary directory and renames it to `<step>` once
complete, so a directory named by its step number holds a committed checkpoint; unfinished saves
and checkpoints moved aside as corrupt (`corrupt-<step>-<time>`) have other names. A bucket has
no atomic rename: there Orbax writes `<step>` in place and marks it complete with
`commit_success.txt` last, and a step without it is a save still running or killed.
"""

from __future__ import annotations

import json

from infra import paths
from infra.errors import UserError
from infra.paths import Path, PathLike

CHECKPOINTS = "checkpoints"
STATE, DATA, META, FINGERPRINT = "state", "data", "meta", "fingerprint"
COMMIT_MARKER = "commit_success.txt"


def checkpoints_dir(workdir: PathLike) -> Path:
    return paths.path(workdir) / CHECKPOINTS


def step_dir(workdir: PathLike, step: int) -> Path:
    return checkpoints_dir(workdir) / str(step)


def is_committed(step_path: Path) -> bool:
    """Whether `<checkpoints>/<step>` is a complete checkpoint (not a save in flight)."""
    if paths.is_remote(step_path):
        return (step_path / COMMIT_MARKER).exists()
    return (step_path / STATE).is_dir() and (step_path / META).is_dir()


def committed_steps(workdir: PathLike) -> list[int]:
    """Steps of the committed checkpoints in `<workdir>/checkpoints`, oldest first."""
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and is_committed(p))


def require_committed(workdir: PathLike) -> list[int]:
    """`committed_steps(workdir)`, or the UserError of a workdir without a checkpoint (the
    common mistake of a command that reads a run)."""
    steps = committed_steps(workdir)
    if not steps:
        raise UserError(f"no checkpoint in '{checkpoints_dir(workdir)}'; train first "
                        f"(python -m infra train --config ... --workdir {workdir})")
    return steps


def uncommitted_steps(workdir: PathLike) -> list[Path]:
    """Step directories of saves that never committed (in a bucket they carry the step's own
    name: a later save of that step would write into their leftovers)."""
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.isdigit() and not is_committed(p))


def moved_aside(workdir: PathLike) -> list[Path]:
    """Checkpoints moved aside as corrupt (`corrupt-<step>-<time>`), oldest first."""
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith("corrupt-"))


def read_meta(path: PathLike) -> dict:
    """The JSON metadata of the checkpoint in step directory `path` (OSError / ValueError when
    it cannot be read)."""
    return json.loads((paths.path(path) / META / "metadata").read_text())
