"""Expert parallelism: the experts split over the `expert` mesh axis, dispatch in `shard_map`.

Each device holds E / X experts (X: the `expert` axis's size) and, outside the experts, its
share of the batch (`batch` is split over `expert` like a data axis). The dropless layer then
runs as: all-gather the tokens, their chosen experts and routing weights over `expert` (the
X devices of a group now see the group's tokens) -> each device computes the assignments to
its own experts (sorted, one grouped matmul per projection, as `moe.dropless`; the other
assignments are past its groups and produce zeros) -> reduce-scatter over `expert`, which
sums every expert's contribution and hands each device its own tokens back. Expert weights
are gathered over `fsdp` on the way in (FSDP) and the hidden dim stays split over `tensor`
(the down projection's partial sums are added over `tensor`).

This design runs on every backend, XLA:CPU included, and is what runs everywhere for now; it
moves every token to every device of its group, X times the bytes of an all-to-all that sends
each assignment only where its expert lives (`jax.lax.ragged_all_to_all`, which XLA:CPU does
not implement).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infra.errors import ConfigError
from infra.sharding import logical_to_spec

AXIS = "expert"


def expert_shards(mesh: Mesh) -> int:
    return int(dict(mesh.shape).get(AXIS, 1))


def check_experts_fit(num_experts: int, mesh: Mesh) -> None:
    """ConfigError unless the experts split evenly over the mesh's `expert` axis (checked when
    the run is built, before anything is written, and again where the dispatch is traced)."""
    shards = expert_shards(mesh)
    if num_experts and num_experts % shards:
        raise ConfigError(f"model.num_experts ({num_experts}) must be a multiple of mesh.expert "
                          f"({shards})", key="mesh.expert",
                          value=max(d for d in range(1, shards + 1) if num_experts % d == 0))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, gate: jax.Array,
             up: jax.Array, down: jax.Array, *, mesh: Mesh, rules, compute) -> jax.Array:
    """``x`` (batch, length, d), ``experts`` / ``weights`` (batch, length, k) -> the experts'
    weighted sum (batch, length, d), the experts split over the `expert` axis. ``compute(x,
    experts, weights, gate, up, down)``: the single-device dropless computation on flat tokens
    whose ``experts`` index the local ``gate`` / ``up`` / ``down`` (ids past them: dropped)."""
    check_experts_fit(gate.shape[0], mesh)
    tokens = logical_to_spec(("batch", "length", None), rules)
    gathered = AXIS in _axes(tokens[0])
    tensor = logical_to_spec(("mlp",), rules)[0]
    w_in = P(AXIS, None, tensor)
    w_out = P(AXIS, tensor, None)

    def reshard(a, spec):
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    def local(x, experts, weights, gate, up, down):
        if gathered:  # this group's tokens, from every device of the expert axis
            x, experts, weights = (jax.lax.all_gather(a, AXIS, axis=0, tiled=True)
                                   for a in (x, experts, weights))
        batch, length, d = x.shape
        mine = gate.shape[0]
        ids = experts - jax.lax.axis_index(AXIS) * mine
        ids = jnp.where((ids >= 0) & (ids < mine), ids, mine)  # another device's: past the end
        y = compute(x.reshape(batch * length, d), ids.reshape(batch * length, -1),
                    weights.reshape(batch * length, -1), gate, up, down)
        y = y.reshape(batch, length, d)
        for axis in _axes(tensor):  # the down projection's partial sums over the hidden dim
            y = jax.lax.psum(y, axis)
        if gathered:
            return jax.lax.psum_scatter(y, AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, AXIS)

    args = (reshard(x, tokens), reshard(experts, tokens), reshard(weights, tokens),
            reshard(gate, w_in), reshard(up, w_in), reshard(down, w_out))
    return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
                         out_specs=tokens)(*args)
