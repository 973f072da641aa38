"""Pipeline parallelism: a transformer's layers split into stages over the `stage` mesh axis,
the batch's microbatches flowing through them (GPipe, with circular repeats).

Layout. The stacked layers (`L` of them, leading dim `layers`, which the rules shard over
`stage`) are viewed as `R` repeats x `S` stages x `L / (S R)` layers: stage `s` holds the
chunks `s, s + S, s + 2S, ...` of consecutive layers. With `R = 1` that is exactly the
contiguous block the `layers` sharding already puts on it, so no weight moves. With `R > 1`
the chunks are not contiguous and each step re-arranges the weights over `stage` (and the
gradients back): the checkpoint keeps the model's own layer order, so it restores on any mesh.

Schedule. One `jax.lax.scan` over `T = R M + S - 1` ticks. At tick `t` stage `s` works on
iteration `i = t - s` (idle unless `0 <= i < R M`): microbatch `i mod M` in repeat `i // M`.
All stages compute at once (`jax.vmap` with `spmd_axis_name="stage"`), then each passes its
output to the next with `jax.lax.ppermute` (stage S-1 to stage 0, which keeps what it receives
in a buffer of M microbatches until the next repeat picks it up; `M >= S` makes it arrive in
time). The buffer starts as the inputs and ends as the outputs. The backward pass is autodiff
of the scan (GPipe's order); with the model's `remat` each tick is rematerialised. Idle
ticks compute on placeholder values whose results are never used: the bubble, (S - 1) / T of
the stage-ticks.

Inside the stages the rules lose `stage` (the vmapped dim holds it), so a block's activation
constraints keep their data / fsdp / tensor layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from infra import sharding
from infra.errors import ConfigError

AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """S stages, M microbatches, R repeats (layer chunks per stage)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def ticks(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The idle fraction of the stage-ticks, (S - 1) / (R M + S - 1)."""
        return (self.stages - 1) / self.ticks


def schedule_for(pipeline, mesh, model, rules, rows: int) -> Schedule | None:
    """The run's schedule (None while `mesh.stage` is 1), checked against the model and the
    ``rows`` of a batch (per gradient-accumulation microbatch): a one-line ConfigError at build
    time rather than a failure while tracing."""
    from infra.config.sections import PipelineConfig

    cfg = PipelineConfig.from_config(pipeline) if pipeline is not None else PipelineConfig()
    stages = int(dict(mesh.shape).get(AXIS, 1))
    if stages == 1:
        return None
    m = cfg.microbatches or stages
    if m % stages:
        raise ConfigError(f"pipeline.microbatches ({m}) must be a multiple of mesh.stage "
                          f"({stages})", key="pipeline.microbatches", value=stages)
    if model.get("name") != "transformer":
        raise ConfigError(f"mesh.stage={stages} splits a transformer's layers into pipeline "
                          f"stages; model.name={model.get('name')!r} has no pipeline",
                          key="mesh.stage", value=1)
    layers = int(model.num_layers)
    chunks = stages * cfg.repeats
    if layers % chunks:
        raise ConfigError(f"model.num_layers ({layers}) must be a multiple of mesh.stage x "
                          f"pipeline.repeats ({stages} x {cfg.repeats})",
                          key="pipeline.repeats", value=1)
    if int(model.get("num_experts", 0) or 0):
        raise ConfigError("pipeline stages do not support mixture-of-experts layers yet (their "
                          "router losses are not split by microbatch); set mesh.stage=1",
                          key="mesh.stage", value=1)
    inner = sharding.batch_shards(mesh, sharding.rules_without(rules, AXIS))
    if rows % (m * inner):
        raise ConfigError(f"a batch of {rows} rows (train.batch_size / train.microbatches) does "
                          f"not split into pipeline.microbatches={m} of {inner} batch shards "
                          f"each; use a multiple of {m * inner} rows")
    return Schedule(stages, m, cfg.repeats)


_ACTIVE: contextvars.ContextVar[Schedule | None] = contextvars.ContextVar(
    "infra_pipeline_schedule", default=None)


@contextlib.contextmanager
def scheduled(schedule: Schedule | None) -> Iterator[None]:
    """While tracing inside this context the transformer runs its layers on `schedule`."""
    token = _ACTIVE.set(schedule)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> Schedule | None:
    return _ACTIVE.get()


def stacked_layers(blocks: nnx.Module, stacked: bool) -> tuple[Any, Any, list[tuple]]:
    """(graphdef of one block, its state with every leaf stacked over the layers, the logical
    names of each leaf in `jax.tree.leaves` order, `layers` first) of the scan layout's stacked
    block (``stacked``) or the loop layout's list of blocks."""
    def names_of(state, prefix: tuple = ()) -> list[tuple]:
        variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return [prefix + tuple(v.get_metadata().get("out_sharding") or ()) for v in variables]

    if stacked:
        graphdef, state = nnx.split(blocks)
        return graphdef, state, names_of(state)
    graphdef, first = nnx.split(blocks[0])
    state = jax.tree.map(lambda *xs: jnp.stack(xs), first,
                         *(nnx.split(b)[1] for b in blocks[1:]))
    return graphdef, state, names_of(first, ("layers",))


def run_blocks(blocks: nnx.Module, stacked: bool, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None, *, schedule: Schedule,
               policy: Callable | None = None) -> jax.Array:
    """A transformer's blocks (the scan layout's stacked block, or the loop layout's list) over
    its residual stream ``x`` as pipeline stages. With a remat ``policy`` each block is
    rematerialised by it and each tick as a whole too (only the ticks' inputs are kept across
    the schedule)."""
    graphdef, weights, names = stacked_layers(blocks, stacked)

    def layer(h: jax.Array, w, pos: jax.Array, seg) -> jax.Array:
        return nnx.merge(graphdef, w).forward(h, pos, seg)[0]

    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)

    def chunk(w, h: jax.Array, pos: jax.Array, seg) -> jax.Array:
        return jax.lax.scan(lambda h, wl: (layer(h, wl, pos, seg), None), h, w)[0]

    side, rows = (positions, segment_ids), (positions.ndim == 2, segment_ids is not None)
    return run(chunk, weights, names, x, side, rows, schedule=schedule,
               remat=policy is not None)[0]


def run(stage_fn: Callable, weights: Any, names: list[tuple], x: jax.Array, side: tuple,
        per_row: tuple[bool, ...], *, schedule: Schedule, remat: bool = False
        ) -> tuple[jax.Array, jax.Array]:
    """The layers over ``x`` (batch, length, d) on the pipeline; returns (output like ``x``,
    the number of busy stage-ticks the program counted).

    ``stage_fn(chunk, h, *side_m)`` applies one chunk of consecutive layers (``chunk``: the
    leaves of ``weights`` with a leading dim of L / (S R) layers) to ``h`` (microbatch, length,
    d); ``side``: further inputs of ``stage_fn``, those marked in ``per_row`` (batch, ...) split
    with the rows, the others passed whole. ``names``: the logical names of each leaf of
    ``weights`` (`jax.tree.leaves` order), `layers` first. ``remat``: keep only each tick's
    input for the backward pass and recompute the tick (``stage_fn`` may rematerialise
    within)."""
    mesh, rules = sharding.active_rules()
    S, M = schedule.stages, schedule.microbatches
    batch = x.shape[0]
    if batch % M:
        raise ConfigError(f"the batch of {batch} rows does not split into pipeline.microbatches "
                          f"({M}); use a multiple of {M} rows (per gradient-accumulation "
                          "microbatch)")
    weights = _arranged(weights, names, schedule)
    inner = sharding.rules_without(rules, AXIS)

    def on_stages(a: jax.Array, logical: tuple) -> jax.Array:  # leading dim over `stage`
        spec = sharding.fit_spec(sharding.logical_to_spec(logical, inner), a.shape[1:], mesh)
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(AXIS, *spec)))

    def split(a):  # rows i, i + M, ... form microbatch i: every device keeps its own rows
        return a.reshape(batch // M, M, *a.shape[1:]).swapaxes(0, 1)

    residual = ("batch", "length", "act_embed")
    with sharding.activation_rules(mesh, inner):
        micro = sharding.constrain(split(x), (None, *residual))
        buffer = on_stages(jnp.broadcast_to(micro, (S, *micro.shape)), (None, *residual))
        side = tuple(split(a) if row else a for a, row in zip(side, per_row))
        stage = _stage(jax.checkpoint(stage_fn) if remat else stage_fn, side, per_row, schedule)
        stages = jax.vmap(stage, in_axes=(0, 0, 0, 0, None), spmd_axis_name=AXIS)
        ring = [(i, (i + 1) % S) for i in range(S)]
        shift = jax.shard_map(lambda a: jax.lax.ppermute(a, AXIS, ring), mesh=mesh,
                              in_specs=P(AXIS), out_specs=P(AXIS), axis_names={AXIS})

        def tick(carry, t):
            received, buf, busy = carry
            out, buf, now = stages(jnp.arange(S), weights, buf, received, t)
            return (shift(out), buf, busy + jnp.sum(now.astype(jnp.int32))), None

        start = on_stages(jnp.zeros((S, *micro.shape[1:]), x.dtype), residual)
        (received, buffer, busy), _ = jax.lax.scan(
            tick, (start, buffer, jnp.zeros((), jnp.int32)), jnp.arange(schedule.ticks))
        last = (schedule.repeats * M - 1) % M  # the last microbatch's output, just received
        out = buffer[0].at[last].set(received[0])
    out = out.swapaxes(0, 1).reshape(x.shape)
    return sharding.constrain(out, residual), busy


def _arranged(weights: Any, names: list[tuple], schedule: Schedule) -> Any:
    """Each stacked leaf (L, ...) as (S, R, L / (S R), ...), stage s's chunks on stage s."""
    S, R = schedule.stages, schedule.repeats

    def arrange(w: jax.Array, logical: tuple) -> jax.Array:
        w = w.reshape(R, S, w.shape[0] // (S * R), *w.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(w, ("layers", None, None, *logical[1:]))

    leaves, tree = jax.tree.flatten(weights)
    return tree.unflatten([arrange(w, n) for w, n in zip(leaves, names, strict=True)])


def _stage(compute: Callable, side: tuple, per_row: tuple[bool, ...],
           schedule: Schedule) -> Callable:
    """What stage ``s`` does at tick ``t``: (its output, its buffer, whether it was busy).
    Stage 0 first keeps what the last stage finished a tick ago in its buffer, then takes its
    input from the buffer; the others take what the previous stage sent."""
    S, M, R = schedule.stages, schedule.microbatches, schedule.repeats

    def stage(s, chunks, buf, received, t):
        i = t - s
        busy = (i >= 0) & (i < R * M)
        m, r = jnp.mod(i, M), jnp.clip(i // M, 0, R - 1)
        done = t - S
        keep = (s == 0) & (done >= 0) & (done < R * M)
        slot = jnp.mod(done, M)
        buf = buf.at[slot].set(jnp.where(keep, received, buf[slot]))
        h = jnp.where(s == 0, buf[m], received)
        args = tuple(a[m] if row else a for a, row in zip(side, per_row))
        chunk = jax.tree.map(lambda w: w[r], chunks)
        return compute(chunk, h, *args), buf, busy

    return stage
