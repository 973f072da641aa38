"""Logical-axis rules -> `NamedSharding` for every parameter, optimizer-state and batch leaf.

Models name their weight dimensions with logical names (`embed`, `heads`, `mlp`, ...); the config's
`sharding.rules` maps those names to mesh axes. Changing parallelism is a config change only.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infra.errors import ConfigError

log = logging.getLogger(__name__)
Rules = Sequence[tuple[str, Any]]


def normalize_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """Check that every rule names real mesh axes (one of ours that a mesh made by hand lacks
    is size 1); return the rules as tuples."""
    from infra.mesh import AXES

    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"sharding.rules entry {rule!r} must be (logical_name, mesh_axes)")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in mesh.shape and axis not in AXES:
                raise ConfigError(
                    f"sharding.rules maps '{name}' to mesh axis '{axis}', which the mesh does not "
                    f"have; mesh axes are {', '.join(mesh.shape)}"
                )
        out.append((name, axes))
    return tuple(out)


def logical_to_spec(logical: Sequence[str | None], rules: Rules) -> P:
    """Map logical dimension names to a PartitionSpec (first matching rule wins, unknown -> None)."""
    table = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    return P(*(table.get(name) if name is not None else None for name in logical))


def param_specs(abstract_model: nnx.Module, rules: Rules) -> dict:
    """Pure dict (same tree as the params) of PartitionSpecs from each Param's `out_sharding`
    logical names. A name without a rule, or a Param without names, is replicated."""
    state = nnx.state(abstract_model, nnx.Param)

    def spec(var: nnx.Variable) -> P:
        logical = var.get_metadata().get("out_sharding") or ()
        return logical_to_spec(tuple(logical), rules)

    specs = jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def _filtered(axes: Any, keep) -> Any:
    """One spec or rule entry (None, an axis, or a tuple of axes) with only the axes `keep`
    accepts; None where none is left."""
    if isinstance(axes, tuple):
        return tuple(a for a in axes if keep(a)) or None
    return axes if axes is not None and keep(axes) else None


def on_mesh(spec: P, mesh: Mesh) -> P:
    """`spec` less the axes `mesh` does not have (a mesh made by hand without, say, `stage`:
    the default rules' axis of size 1)."""
    return P(*(_filtered(axes, mesh.shape.__contains__) for axes in spec))


def rules_without(rules: Rules, axis: str) -> tuple[tuple[str, Any], ...]:
    """The rules with mesh axis `axis` removed from every entry (inside a `shard_map` manual
    over it, or where a vmapped dim holds it)."""
    return tuple((name, _filtered(axes, lambda a: a != axis)) for name, axes in rules)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. 2 kv heads over tensor=4), and
    those the mesh does not have."""
    fitted = []
    spec = on_mesh(spec, mesh)
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if size and dim % size == 0 else None)
    return P(*fitted)


def named_shardings(specs: Any, shapes: Any, mesh: Mesh) -> Any:
    """Tree of PartitionSpecs + tree of shapes -> tree of NamedShardings (specs fitted to shapes)."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: Any, param_shardings: dict, mesh: Mesh) -> Any:
    """Shardings for a whole train state: a leaf whose dict-key path ends with a parameter's path
    and has its shape (Adam's `mu`, `nu`, ...) is sharded like that parameter; the rest is replicated.
    """
    by_path = {
        _dict_keys(path): s.spec
        for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            spec = by_path.get(keys[start:])
            if spec is not None and len(spec) <= len(leaf.shape):
                return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_sharding(mesh: Mesh, rules: Rules, logical: Sequence[str] = ("batch",)) -> NamedSharding:
    """Sharding of an input array whose leading dims have the given logical names."""
    return NamedSharding(mesh, on_mesh(logical_to_spec(logical, rules), mesh))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the global batch is split (the product of the mesh axes `batch` maps to)."""
    return _mesh_size(mesh, logical_to_spec(("batch",), rules)[0])


def _mesh_size(mesh: Mesh, spec_entry) -> int:
    """Number of shards of one PartitionSpec entry (None, an axis name or a tuple of them)."""
    names = spec_entry if isinstance(spec_entry, tuple) else (spec_entry,) if spec_entry else ()
    return math.prod(mesh.shape.get(a, 1) for a in names)


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, process_count: int,
                     microbatches: int = 1, rows_per_example: int = 1) -> None:
    """The global batch (`batch_size` examples of `rows_per_example` rows each: GRPO's
    completions per prompt) must split evenly over batch shards, processes and microbatches."""
    shards = batch_shards(mesh, rules)
    need = math.lcm(shards, process_count) * microbatches
    rows = batch_size * rows_per_example
    if rows % need:
        what = (f"train.batch_size={batch_size}" if rows_per_example == 1 else
                f"the {rows} rows of train.batch_size={batch_size} x {rows_per_example}")
        raise ConfigError(
            f"{what} is not divisible by the {shards} batch shards of the mesh "
            f"({' x '.join(f'{a}={s}' for a, s in mesh.shape.items())}), {process_count} process(es) "
            f"and {microbatches} microbatch(es); "
            f"use a multiple of {need // math.gcd(need, rows_per_example)} examples"
        )


def sharding_table(params: Any, shardings: Any, warn_replicated_mb: float) -> str:
    """A short table of how each parameter is laid out, warning about large replicated ones."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    total = per_device = 0
    warnings = []
    for (path, leaf), sharding in zip(flat, flat_sh):
        name = "/".join(str(k) for k in _dict_keys(path))
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        shard_shape = sharding.shard_shape(leaf.shape)
        local = math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        per_device += local
        spec = ", ".join(str(a) if a else "-" for a in sharding.spec) or "replicated"
        rows.append((name, "x".join(map(str, leaf.shape)), spec, f"{local / 2**20:.2f}"))
        if local == nbytes and nbytes > warn_replicated_mb * 2**20 and sharding.mesh.size > 1:
            warnings.append(f"warning: {name} ({nbytes / 2**20:.1f} MiB) is replicated on every device")
    widths = [max(len(r[i]) for r in rows + [("param", "shape", "mesh axes", "MiB/dev")]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    lines = [fmt(("param", "shape", "mesh axes", "MiB/dev"))] + [fmt(r) for r in rows]
    lines.append(
        f"total {total / 2**20:.2f} MiB of parameters, {per_device / 2**20:.2f} MiB per device"
    )
    return "\n".join(lines + warnings)


def batch_shardings(mesh: Mesh, rules: Rules, axes: dict[str, Sequence[str]]) -> dict:
    """NamedSharding per batch key, from the logical names of its leading dimensions."""
    return {k: batch_sharding(mesh, rules, names) for k, names in axes.items()}


def to_global(local_batch: dict, shardings: dict) -> dict:
    """This process's numpy batch -> global `jax.Array`s (rows from all processes together)."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], v, (v.shape[0] * jax.process_count(),) + v.shape[1:]
        )
        for k, v in local_batch.items()
    }


_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "infra_activation_rules", default=None
)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the rules' layout."""
    token = _ACTIVATIONS.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def active_rules() -> tuple[Mesh, tuple] | None:
    """(mesh, rules) of the enclosing `activation_rules`, None outside one."""
    return _ACTIVATIONS.get()


def activation_shards(logical: str) -> int:
    """How many ways activations' logical axis ``logical`` is split under the active rules
    (1 outside `activation_rules`)."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return 1
    mesh, rules = ctx
    return _mesh_size(mesh, logical_to_spec((logical,), rules)[0])


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names (`("batch", "length", "act_embed")`).

    Models call this on activations; it is a no-op outside `activation_rules` (e.g. in eager
    tests), so models stay mesh-agnostic.
    """
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = fit_spec(logical_to_spec(logical, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
