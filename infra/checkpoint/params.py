"""`restore_params`: the parameters of a run's checkpoint, for anything that is not resuming it.

Serving, `generate`, evaluation, export and fine-tuning from a workdir all need only the model's
parameters, on their own mesh, and must never change the run they read from (it may still be
training). This loader reads only the `params` subtree (Orbax partial restore) onto the
shardings of the abstract parameters it is given, checks every array's checksum against the
checkpoint's, and moves or deletes nothing: a damaged step is skipped with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp

from infra import paths
from infra.checkpoint import layout
from infra.checkpoint.newest import UnreadableStep, newest_intact
from infra.checkpoint.verify import Corrupt, check_fingerprint, first_mismatch, saved_specs, specs
from infra.errors import CheckpointError, UserError

log = logging.getLogger(__name__)


def restore_params(workdir: paths.PathLike, abstract_params: Any, *,
                   step: int | None = None) -> tuple[Any, int]:
    """(parameters, step) of the newest intact checkpoint in `workdir` (or of `step`).

    `abstract_params` is the parameter tree as `jax.ShapeDtypeStruct`s carrying the target
    shardings (e.g. `ShardedState.abstract["params"]`); the result has that structure. Raises
    UserError when there is no checkpoint or its arrays do not fit (another model), and
    CheckpointError when no checkpoint (or `step`) is intact. Read-only.
    """
    workdir = paths.path(workdir)
    if not paths.is_remote(workdir):
        workdir = workdir.absolute()  # Orbax reads no array metadata through a relative path
    directory = layout.checkpoints_dir(workdir)
    steps = layout.require_committed(workdir)
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint of step {step} in '{directory}'; committed steps: "
                        f"{', '.join(map(str, steps))}")
    problems: list[str] = []

    def replaced(s: int) -> bool:  # a run still training there committed a newer step
        now = layout.committed_steps(workdir)
        return s not in now or (step is None and max(now, default=s) > s)

    try:
        found = newest_intact(
            lambda: [step] if step is not None else layout.committed_steps(workdir),
            lambda s: _restore_step(directory / str(s), abstract_params),
            step_dir=lambda s: directory / str(s), replaced=replaced,
            on_corrupt=lambda s, e: problems.append(f"step {s} ({e})"))
    except UnreadableStep as e:
        raise CheckpointError(f"cannot read checkpoint step {e.step} in {directory}: {e}; fix "
                              "that and try again") from None
    if found is None:
        raise CheckpointError(f"no intact checkpoint in {directory} ({'; '.join(problems)})")
    s, params = found
    for problem in problems:
        log.warning("warning: checkpoint %s is corrupted; using step %d", problem, s)
    return params, s


def _restore_step(path: paths.Path, abstract_params: Any) -> Any:
    """The verified `params` of the checkpoint in step directory `path`."""
    target = {"params": abstract_params}
    saved = {name: spec for name, spec in saved_specs(path / layout.STATE).items()
             if name.startswith("params/")}  # the optimizer state is not read
    here = specs(target)
    if not saved:  # damaged index files read back as a partial (often empty) tree
        raise Corrupt(f"no array metadata for '{min(here)}'")
    mismatch = first_mismatch(saved, here)
    if mismatch is not None:
        name, kind = mismatch
        what = {"missing": f"does not hold this model's parameter '{name}'",
                "extra": f"holds parameter '{name}', which this model does not have",
                "spec": f"does not match the model: '{name}' is {saved.get(name)} there but "
                        f"{here.get(name)} here"}[kind]
        raise UserError(f"checkpoint {path} {what}; pass the workdir the checkpoint was "
                        "trained in")
    restored = ocp.PyTreeCheckpointer().restore(
        path / layout.STATE,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    check_fingerprint(path, {"params": restored["params"]}, whole=False)
    return restored["params"]
