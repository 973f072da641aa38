"""A run in a workdir, read: its saved config, its model's abstract parameters, its parameters.

Everything that uses a run it did not train itself goes through here: `generate` and serving
(`infra.serve.loading.load_model`), `hf export`, `init.from` and `hf import` (which builds the
abstract parameters to stream a checkpoint onto). Nothing here changes the workdir: the
parameters come from `infra.checkpoint.restore_params` (read-only, checksums verified).

    config = load_config(workdir)                  # a language-model run's resolved config
    abstract = abstract_params(config, mesh)       # ShapeDtypeStructs with their shardings
    params, step = load_params(workdir, config, abstract)

`load_params` reads the checkpoint in the layer layout the run saved it in (`model.scan_layers`
of its `config.json`) and converts it to `config`'s (`infra.models.layers.convert_layers`).

JAX is imported inside the functions, as in the modules that call them.
"""

from __future__ import annotations

from typing import Any

from infra import config as config_lib
from infra import mesh as mesh_lib
from infra import paths, sharding
from infra.checkpoint import layout, restore_params
from infra.errors import UserError
from infra.models.layers import convert_layers, restrict_like
from infra.paths import PathLike
from infra.state import shard_state
from infra.tasks import LM_TASKS, get_task, logical_rules


def load_config(workdir: PathLike, command: str = "generate"):
    """The resolved config of a language-model run in `workdir` (UserError naming `command`
    otherwise)."""
    raw = config_lib.read_saved(workdir)
    if raw.get("task") not in LM_TASKS:
        raise UserError(f"{command} needs a language-model run (task {', '.join(LM_TASKS)}); "
                        f"{workdir}/{config_lib.CONFIG_FILE} has task {raw.get('task')!r}")
    return config_lib.load_saved(workdir, raw)


def require_checkpoint(workdir: PathLike) -> None:
    """UserError unless `workdir` holds a committed checkpoint (the common mistake: checked
    before anything is built)."""
    layout.require_committed(paths.path(workdir))


def sharded_model(config, mesh=None):
    """(ShardedState, rules): `config`'s model on `mesh` (default: the config's mesh) with no
    optimizer state, nothing allocated (`.abstract["params"]`, `.model` to merge parameters
    into), and the logical-axis rules it was placed by."""
    import optax

    mesh = mesh or mesh_lib.make_mesh(config.mesh)
    rules = sharding.normalize_rules(logical_rules(config), mesh)
    return shard_state(get_task(config).build_model, optax.identity(), mesh, rules), rules


def abstract_params(config, mesh=None):
    """The parameter tree of `config`'s model as ShapeDtypeStructs with their shardings on
    `mesh` (default: the config's mesh)."""
    return sharded_model(config, mesh)[0].abstract["params"]


def load_params(workdir: PathLike, config, abstract: Any, *,
                step: int | None = None) -> tuple[Any, int]:
    """(parameters, step) of the newest intact checkpoint in `workdir` (or of `step`) onto
    `abstract` (`config`'s parameters with their shardings), whatever the layer layout the run
    saved them in: a transformer saved with another `model.scan_layers` than `config`'s is
    restored in its own layout on the same mesh, then stacked / unstacked."""
    from ml_collections import ConfigDict

    saved_scan = bool(config_lib.read_saved(workdir).get("model", {}).get("scan_layers", False))
    if config.model.name != "transformer" or saved_scan == config.model.scan_layers:
        return restore_params(workdir, abstract, step=step)
    import jax

    saved = ConfigDict(config.to_dict())
    saved.model.scan_layers = saved_scan
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    saved_abstract = restrict_like(abstract_params(saved, mesh), abstract)
    params, step = restore_params(workdir, saved_abstract, step=step)
    return convert_layers(params, config.model.num_layers, abstract), step
