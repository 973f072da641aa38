"""Mixture-of-experts feed-forward: a softmax top-k router over `num_experts` SwiGLU experts.

Each token's router logits (float32) give probabilities over the experts; the token goes
through its `experts_per_token` likeliest, and their outputs are summed weighted by those
probabilities (renormalised over the chosen ones with `norm_topk_prob`, as Mixtral and
Qwen3-MoE do). Two ways to compute the experts, the same function where nothing is dropped:

* **Dropless** (`capacity_factor` <= 0): the (token, choice) assignments are sorted by expert,
  each projection is one grouped matmul over the sorted rows (`jax.lax.ragged_dot` on TPU /
  GPU; on CPU, whose `ragged_dot` computes every group for every row, one batched matmul over
  blocks of each group's rows), and the rows are put back in token order. Both
  moves are permutations whose backward is the inverse permutation (`permute`), so the
  gradient is two gathers, not scatters.
* **Dropping** (`capacity_factor` > 0): every expert takes at most
  ``ceil(capacity_factor * tokens * k / experts)`` assignments into a fixed (experts, capacity,
  d_model) buffer, computed as dense batched matmuls. Assignments are served choice by choice
  (every token's first choice before any second choice), in token order within a choice; the
  ones past an expert's capacity are dropped: they add nothing, and the token keeps only its
  residual and its other choices.

Optional shared experts (DeepSeek) are a dense SwiGLU every token goes through. The layer
returns the router statistics the loss and the logs need (`router_stats`): the load-balancing
loss ``E * sum_e f_e * P_e`` (f_e: tokens choosing expert e / tokens, so it sums to k; P_e: the
mean router probability of e; k under uniform routing; the Switch / Mixtral form per layer),
the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE), each expert's share of the
assignments, the dropped fraction and the router's mean entropy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from infra.errors import ConfigError
from infra.models import moe_parallel
from infra.sharding import active_rules, constrain

GROUP_BLOCK = 128  # rows per block of `blocked_matmul` (CPU's grouped matmul)


@jax.custom_vjp
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[order]`` for a permutation ``order`` whose inverse is ``inverse``: the backward is
    the gather ``g[inverse]`` instead of a scatter."""
    return x[order]


def _permute_fwd(x, order, inverse):
    return x[order], inverse


def _permute_bwd(inverse, g):
    return g[inverse], None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def route(logits: jax.Array, k: int, norm_topk_prob: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(probabilities (tokens, E), weights (tokens, k), experts (tokens, k) int32) of float32
    router ``logits`` (tokens, E): softmax over all experts, the top k, renormalised over the
    chosen with ``norm_topk_prob``."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Assignments each expert takes on the dropping path."""
    return max(1, math.ceil(factor * tokens * k / num_experts))


def swiglu(x: jax.Array, gate, up, down, matmul) -> jax.Array:
    return matmul(jax.nn.silu(matmul(x, gate)) * matmul(x, up), down)


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """Rows ``x`` (m, d) sorted into consecutive groups of ``sizes`` (E,) rows, group g times
    ``w[g]`` (E, d, f): `jax.lax.ragged_dot` on TPU / GPU; on CPU, where that is a dense loop
    over every group for every row, `blocked_matmul`."""
    if jax.default_backend() == "cpu":
        return blocked_matmul(x, w, sizes)
    return jax.lax.ragged_dot(x, w, sizes)


def blocked_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, block: int = GROUP_BLOCK
                   ) -> jax.Array:
    """`grouped_matmul` as one batched matmul: each group's rows padded to a multiple of
    `block` rows, every block of rows times its group's weights (gathered per block). The work
    is the rows' own plus at most E * (block - 1) padding rows; rows past the groups (more
    rows than ``sum(sizes)``) come out zero."""
    m, d = x.shape
    groups = w.shape[0]
    blocks = -(-(m + groups * (block - 1)) // block)
    padded = (sizes + block - 1) // block * block
    ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)
    row = jnp.arange(m)
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), groups - 1)
    dest = (padded_ends - padded)[group] + row - (ends - sizes)[group]  # row's padded position
    dest = jnp.where(row < ends[-1], dest, blocks * block)  # past the groups: nowhere
    rows = jnp.zeros((blocks * block, d), x.dtype).at[dest].set(x, mode="drop")
    block_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(blocks) * block,
                                               side="right"), groups - 1)
    out = jnp.einsum("bnd,bdf->bnf", rows.reshape(blocks, block, d), w[block_group])
    return jnp.take(out.reshape(blocks * block, -1), dest, axis=0, mode="fill", fill_value=0)


def dropless(x: jax.Array, experts: jax.Array, weights: jax.Array, gate: jax.Array,
             up: jax.Array, down: jax.Array) -> jax.Array:
    """Every assignment computed: ``x`` (tokens, d), ``experts`` / ``weights`` (tokens, k),
    expert weights (E, d, f), (E, d, f), (E, f, d) -> (tokens, d). An expert id E (past the
    weights: another device's expert, `moe_parallel`) contributes nothing."""
    tokens, k = experts.shape
    flat = experts.reshape(-1)  # assignment t * k + j
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    rows = permute(jnp.repeat(x, k, axis=0), order, inverse)  # sorted by expert

    def matmul(a, w):
        return grouped_matmul(a, w, sizes)

    out = permute(swiglu(rows, gate, up, down, matmul), inverse, order)
    out = jnp.where((flat < gate.shape[0])[:, None], out, 0)
    return jnp.einsum("tkd,tk->td", out.reshape(tokens, k, -1), weights.astype(out.dtype))


def dropping(x: jax.Array, experts: jax.Array, weights: jax.Array, gate: jax.Array,
             up: jax.Array, down: jax.Array, factor: float) -> tuple[jax.Array, jax.Array]:
    """At most `capacity` assignments per expert (module docstring): (tokens, d) and the kept
    mask of the assignments (k, tokens), choice-major."""
    tokens, k = experts.shape
    num_experts = gate.shape[0]
    cap = capacity(tokens, k, num_experts, factor)
    choice_major = experts.T.reshape(-1)  # assignment j * tokens + t
    onehot = jax.nn.one_hot(choice_major, num_experts, dtype=jnp.int32)
    position = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
    kept = position < cap
    slot = jnp.where(kept, choice_major * cap + position, num_experts * cap)  # past the end: dropped
    buffer = jnp.zeros((num_experts * cap, x.shape[-1]), x.dtype)
    buffer = buffer.at[slot].set(jnp.tile(x, (k, 1)), mode="drop").reshape(num_experts, cap, -1)

    def matmul(a, w):
        return jnp.einsum("ecd,edf->ecf", a, w)

    out = swiglu(buffer, gate, up, down, matmul).reshape(num_experts * cap, -1)
    per_choice = jnp.take(out, slot, axis=0, mode="fill", fill_value=0).reshape(k, tokens, -1)
    y = jnp.einsum("ktd,tk->td", per_choice, weights.astype(out.dtype))
    return y, kept.reshape(k, tokens)


def router_stats(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                 kept: jax.Array | None) -> dict[str, jax.Array]:
    """The statistics of one layer's routing (module docstring), float32."""
    tokens, k = experts.shape
    num_experts = probs.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1))
    share = counts / tokens  # f_e: sums to k
    return {
        "aux_loss": num_experts * jnp.sum(share * jnp.mean(probs, axis=0)),
        "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        "load": counts / (tokens * k),
        "dropped": jnp.float32(0.0) if kept is None else 1.0 - jnp.mean(kept.astype(jnp.float32)),
        "entropy": -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)),
    }


class MoE(nnx.Module):
    """The experts' SwiGLU weights stacked on a leading ``expert`` axis: gate and up
    (E, d_model, hidden) ("expert", "embed", "mlp"), down (E, hidden, d_model); the router
    (d_model, E) ("embed", None); ``shared``: the dense SwiGLU (`MLP`) of the shared experts,
    if any."""

    lora_targets: dict[str, int] = {}  # adapters go on attention (experts: not yet)

    def __init__(self, *, d_model: int, num_experts: int, experts_per_token: int, hidden: int,
                 out_scale: float, dtype, param_dtype, rngs: nnx.Rngs,
                 norm_topk_prob: bool = True, capacity_factor: float = 0.0,
                 shared: nnx.Module | None = None):
        self.dtype = dtype
        self.k = experts_per_token
        self.norm_topk_prob = norm_topk_prob
        self.capacity_factor = capacity_factor
        e = num_experts

        def param(std: float, shape: tuple[int, ...], axes: tuple) -> nnx.Param:
            init = jax.nn.initializers.normal(stddev=std)
            return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=axes)

        self.router = param(d_model ** -0.5, (d_model, e), ("embed", None))
        self.gate = param(d_model ** -0.5, (e, d_model, hidden), ("expert", "embed", "mlp"))
        self.up = param(d_model ** -0.5, (e, d_model, hidden), ("expert", "embed", "mlp"))
        self.down = param(out_scale / math.sqrt(hidden), (e, hidden, d_model),
                          ("expert", "mlp", "embed"))
        if shared is not None:
            self.shared = shared

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(batch, length, d_model) -> the same shape, and this layer's router statistics."""
        batch, length, d = x.shape
        x = x.astype(self.dtype)
        flat = x.reshape(batch * length, d)
        logits = jnp.dot(flat.astype(jnp.float32), self.router[...].astype(jnp.float32))
        probs, weights, experts = route(logits, self.k, self.norm_topk_prob)
        gate, up, down = (getattr(self, n)[...].astype(self.dtype) for n in ("gate", "up", "down"))
        active = active_rules()
        if active is not None and moe_parallel.expert_shards(active[0]) > 1:
            if self.capacity_factor > 0:
                raise ConfigError("model.capacity_factor > 0 (the dropping path) runs without "
                                  "an expert mesh axis; set mesh.expert=1 or "
                                  "model.capacity_factor=0 (dropless)")
            shape = (batch, length, self.k)
            y = moe_parallel.dispatch(x, experts.reshape(shape), weights.reshape(shape), gate,
                                      up, down, mesh=active[0], rules=active[1],
                                      compute=dropless)
            kept = None
        elif self.capacity_factor > 0:
            y, kept = dropping(flat, experts, weights, gate, up, down, self.capacity_factor)
        else:
            y, kept = dropless(flat, experts, weights, gate, up, down), None
        y = constrain(y.reshape(batch, length, d), ("batch", "length", "act_embed"))
        if hasattr(self, "shared"):
            y = y + self.shared(x)
        return y, router_stats(logits, probs, experts, kept)


class RouterTerms(NamedTuple):
    """What the routers add to a training loss (their weighted auxiliary losses) and the
    metrics they log; `NONE` for a dense model."""

    loss: jax.Array | float
    metrics: dict[str, jax.Array]


NONE = RouterTerms(0.0, {})


def router_terms(stats: dict[str, jax.Array], aux_weight: float, z_weight: float
                 ) -> RouterTerms:
    """The loss terms and `moe/...` metrics of `stats` (means over the MoE layers): the
    load-balancing and z-losses, the dropped fraction, the router entropy and each expert's
    share of the assignments (`moe/load/<e>`; 1 / num_experts each when balanced)."""
    metrics = {"moe/aux_loss": stats["aux_loss"], "moe/z_loss": stats["z_loss"],
               "moe/dropped_fraction": stats["dropped"], "moe/router_entropy": stats["entropy"]}
    metrics |= {f"moe/load/{e}": stats["load"][e] for e in range(stats["load"].shape[0])}
    return RouterTerms(aux_weight * stats["aux_loss"] + z_weight * stats["z_loss"], metrics)
