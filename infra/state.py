"""The train state: a plain pytree `{"params", "opt_state", "step", "rng"}`, created sharded.

The model is a Flax NNX module only at the edges: its abstract form gives the parameter tree
and logical axes, and `ModelDef.merge(params)` rebuilds it from a pure dict inside a jitted step.

A run may train only part of the parameters (`Task.trainable`, an NNX filter: LoRA adapters):
then `params` still holds every parameter (the checkpoint has the frozen base too, so resuming
is bit-exact), the optimizer state exists for the trained ones only, and the step differentiates
and updates only them (`ModelDef.split_trained`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infra import sharding
from infra.errors import ConfigError

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """How to turn a pure dict of parameters back into the NNX module."""

    graphdef: Any
    abstract_params: nnx.State
    trained: frozenset | None = None  # flattened paths of the trained params; None = all

    def merge(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.abstract_params)  # a fresh copy to fill in
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def split_trained(self, params: dict) -> tuple[dict, dict | None]:
        """(trained params, frozen params) of a pure-dict tree; (params, None) when all train."""
        if self.trained is None:
            return params, None
        flat = traverse_util.flatten_dict(params)
        trained = {k: v for k, v in flat.items() if k in self.trained}
        frozen = {k: v for k, v in flat.items() if k not in self.trained}
        return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def join_trained(trained: dict, frozen: dict | None) -> dict:
    """The inverse of `ModelDef.split_trained`."""
    if frozen is None:
        return trained
    return traverse_util.unflatten_dict(
        traverse_util.flatten_dict(frozen) | traverse_util.flatten_dict(trained))


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` while only shapes are built: every stream gives one fixed key
    and counts nothing. A real `Rngs` advances a counter at each draw; under `eval_shape` each
    update makes JAX format an error message (the tracer's origin) that flax discards, which
    grows with the traced program: most of a large model's abstract build."""

    def __getattr__(self, stream: str) -> Callable[[], jax.Array]:
        if stream.startswith("__"):
            raise AttributeError(stream)
        return lambda: jax.random.key(0)


def abstract_model(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """The model with shapes only: no memory allocated, no sharding applied yet."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build(ShapeOnlyRngs()))


def model_def(model: nnx.Module, trainable=None) -> ModelDef:
    """`trainable`: an NNX filter of the params the step trains (None: all of them)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        names = ", ".join(sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))}))
        raise ConfigError(f"model holds non-parameter state ({names}); only nnx.Param variables are supported")
    trained = None
    if trainable is not None:
        chosen = nnx.to_pure_dict(nnx.state(model, trainable))
        trained = frozenset(traverse_util.flatten_dict(chosen))
        if not trained:
            raise ConfigError("the run would train no parameters (the task's trainable filter "
                              "selects none)")
    return ModelDef(graphdef, params, trained)


def init_fn(build: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
            trainable=None):
    """`key -> state`: a fresh model, its optimizer state (of the `trainable` params only; None
    = all), step 0 and the loop's rng."""

    def init(key: jax.Array) -> State:
        init_key, loop_key = jax.random.split(key)
        with nnx.use_eager_sharding(False):
            model = build(nnx.Rngs(init_key))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        trained = params if trainable is None else nnx.to_pure_dict(nnx.state(model, trainable))
        return {
            "params": params,
            "opt_state": tx.init(trained),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(loop_key),
        }

    return init


def _state_shapes(abstract: nnx.Module, tx: optax.GradientTransformation, trainable) -> State:
    """The shapes `init_fn` returns, from the abstract model already built (building the
    model is most of a large model's start-up: it is done once)."""
    pure = lambda filt: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(abstract, filt)))
    params = pure(nnx.Param)
    trained = params if trainable is None else pure(trainable)
    return {"params": params, "opt_state": jax.eval_shape(tx.init, trained),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}


@dataclasses.dataclass(frozen=True)
class ShardedState:
    """Everything derived from the abstract model: shapes, shardings and the sharded init."""

    model: ModelDef
    abstract: State  # ShapeDtypeStructs carrying their target shardings
    shardings: State
    init: Callable[[jax.Array], State]  # jitted: creates the state directly in its shardings
    # jitted `(key, given) -> state`: as `init`, but with `given` (a subtree of the parameters,
    # e.g. a pretrained base, donated) in place of those parameters, which are never drawn
    init_around: Callable[[jax.Array, dict], State]


def shard_state(build, tx, mesh: Mesh, rules, trainable=None) -> ShardedState:
    """eval_shape the init, derive each leaf's sharding from the rules, jit init with out_shardings.
    `trainable`: an NNX filter of the params to train and keep optimizer state for (None: all)."""
    abstract = abstract_model(build)
    specs = sharding.param_specs(abstract, rules)
    init = init_fn(build, tx, trainable)
    shapes = _state_shapes(abstract, tx, trainable)
    param_sh = sharding.named_shardings(specs, shapes["params"], mesh)
    shardings = sharding.state_shardings(shapes, param_sh, mesh)
    shardings["params"] = param_sh
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return ShardedState(
        model=model_def(abstract, trainable),
        abstract=abstract_state,
        shardings=shardings,
        init=jax.jit(init, out_shardings=shardings),
        init_around=jax.jit(_around(init), out_shardings=shardings, donate_argnums=1),
    )


def _around(init: Callable[[jax.Array], State]) -> Callable[[jax.Array, dict], State]:
    """`init` with a subtree of the parameters given: compiled together, the random draws of
    the given parameters are dead code (removed), so starting from pretrained weights costs
    no second copy of them."""

    def around(key: jax.Array, given: dict) -> State:
        state = init(key)
        return {**state, "params": join_trained(given, state["params"])}

    return around


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
