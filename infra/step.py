"""The train and eval step functions (pure; `infra.train.build` jits them with shardings)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from infra import sharding
from infra.models import pipeline
from infra.state import State, join_trained
from infra.tasks import Task


def make_steps(
    task: Task,
    merge: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    microbatches: int,
    mesh: jax.sharding.Mesh,
    rules,
    split_trained: Callable | None = None,
    stages: pipeline.Schedule | None = None,
) -> tuple[Callable, Callable]:
    """`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> metrics`.

    With `microbatches = k > 1` the batch is split into k equal microbatches whose gradients are
    accumulated with `jax.lax.scan`: the same update as one big batch, at 1/k of the activation
    memory. Activations are pinned to the logical-axis rules while tracing, and a transformer's
    layers run on the pipeline schedule `stages` when there is one (`mesh.stage` > 1).

    `split_trained(params) -> (trained, frozen)` (`ModelDef.split_trained`): only `trained` is
    differentiated and updated (the optimizer state is theirs); `frozen` passes through the step
    bit for bit and no gradient is computed for it. None: every parameter trains.

    A task with `updates_per_batch = n > 1` (GRPO's `rl.num_iterations`) gets n optimizer
    updates per step on the same batch, in a scan: a step is then one batch, not one update.
    """
    axes = task.batch_axes()
    split_trained = split_trained or (lambda params: (params, None))
    updates_per_batch = int(task.updates_per_batch)
    update = make_update(task, merge, tx, microbatches=microbatches, axes=axes)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        with sharding.activation_rules(mesh, rules), pipeline.scheduled(stages):
            rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            trained, frozen = split_trained(state["params"])
            if updates_per_batch == 1:
                trained, opt_state, metrics = update(trained, state["opt_state"], frozen, batch,
                                                     rng)
            else:  # several updates on one batch (RL: rollouts reused); metrics: their mean
                def body(carry, i):
                    t, o, m = update(*carry, frozen, batch, jax.random.fold_in(rng, i))
                    return (t, o), m

                (trained, opt_state), stacked = jax.lax.scan(
                    body, (trained, state["opt_state"]), jnp.arange(updates_per_batch))
                metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
        new_state = {
            "params": join_trained(trained, frozen),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        return new_state, metrics | {"lr": schedule(state["step"] * updates_per_batch)}

    def eval_step(params: dict, batch: dict) -> dict:
        with sharding.activation_rules(mesh, rules), pipeline.scheduled(stages):
            return task.eval_fn(merge(params), batch)

    return train_step, eval_step


def make_update(task: Task, merge: Callable, tx: optax.GradientTransformation, *,
                microbatches: int, axes: dict) -> Callable:
    """`update(trained, opt_state, frozen, batch, rng) -> (trained, opt_state, metrics)`: one
    optimizer update of the trained parameters on `batch` (its gradient accumulated over
    `microbatches`), skipped when anything is not finite (`apply_if_finite`)."""

    def update(trained, opt_state, frozen, batch: dict, rng: jax.Array):
        def grads_of(mb: dict, mb_rng: jax.Array):
            def loss_of(p):
                return task.loss_fn(merge(join_trained(p, frozen)), mb, mb_rng)

            (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
            return grads, {"loss": loss, **metrics}

        grads, metrics = accumulate(grads_of, batch, rng, microbatches=microbatches,
                                    axes=axes, loss_weight=task.loss_weight)
        updates, new_opt_state = tx.update(grads, opt_state, trained)
        new_trained, new_opt_state, health = apply_if_finite(
            trained, updates, new_opt_state, opt_state, grads, metrics["loss"])
        return new_trained, new_opt_state, metrics | health

    return update


def accumulate(grads_of: Callable, batch: dict, rng: jax.Array, *, microbatches: int,
               axes: dict, loss_weight: Callable) -> tuple:
    """`grads_of(batch, rng) -> (grads, metrics)` over the whole batch: directly, or as the
    mean over `microbatches` equal microbatches accumulated with a scan (weighted by
    `loss_weight` where a loss is a mean over a count that varies between microbatches)."""
    if microbatches == 1:
        return grads_of(batch, rng)

    def split(x: jax.Array, key: str) -> jax.Array:
        # Microbatch i takes rows i, i+k, i+2k, ...: every device keeps its own rows, so
        # splitting moves no data between devices.
        x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, *axes.get(key, ("batch",))))

    micro = {k: split(v, k) for k, v in batch.items()}
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grads_of, first, rng))
    if loss_weight(first) is not None:
        # A loss that is a mean over a varying count (SFT's learnt tokens): weight each
        # microbatch by its share of the count, so the update is the whole batch's mean.
        counts = jax.vmap(loss_weight)(micro)
        weights = counts / jnp.maximum(jnp.sum(counts), 1.0)

        def weighted(acc, xs):
            mb, i, w = xs
            out = grads_of(mb, jax.random.fold_in(rng, i))
            return jax.tree.map(lambda a, o: a + w * o, acc, out), None

        total, _ = jax.lax.scan(weighted, zeros, (micro, jnp.arange(microbatches), weights))
        return total

    def body(acc, xs):
        mb, i = xs
        out = grads_of(mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, out), None

    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(microbatches)))
    return jax.tree.map(lambda x: x / microbatches, total)


def apply_if_finite(params, updates, opt_state, old_opt_state, grads,
                    loss: jax.Array) -> tuple[object, object, dict]:
    """(new params, new optimizer state, metrics): the update applied only when the loss, the
    gradient and the update are finite. A NaN/Inf must not reach the parameters or the
    optimizer state: such a step is skipped (the loop then stops or goes on, by
    `train.nonfinite`), so every checkpoint stays finite. A finite update of finite parameters
    with a finite norm cannot overflow them."""
    grad_norm = optax.tree.norm(grads)
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    new_params, new_opt_state = jax.lax.cond(
        finite,
        lambda: (optax.apply_updates(params, updates), opt_state),
        lambda: (params, old_opt_state),
    )
    health = {"grad_norm": grad_norm, "update_norm": update_norm,
              "skipped": 1.0 - finite.astype(jnp.float32)}
    return new_params, new_opt_state, health
