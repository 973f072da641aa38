"""The train step of a run that trains part of its parameters (LoRA): frozen weights not donated.

A jitted step donates the state it replaces, so its buffers are reused in place. Donation is
per argument, and a LoRA run's frozen base (99% of the parameters) never changes: donated
with the rest, every asynchronous checkpoint would have to copy it first (the step after the
save takes the buffers over). `FrozenStep` passes the frozen parameters as an argument of their
own that is not donated and not returned: the step updates the rest in place, the frozen arrays
stay the same objects all run long, and `Checkpointer(shared=...)` saves them without a copy.
Called and lowered like the jitted `(state, batch) -> (state, metrics)` it wraps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from infra.state import State, join_trained


class FrozenStep:
    """`step(state, batch) -> (state, metrics)` jitted with `state`'s frozen parameters (the
    complement of `split_trained`'s first part) passed undonated."""

    def __init__(self, step: Callable, split_trained: Callable, shardings: State, batch_shardings,
                 metrics_sharding):
        self._split_trained = split_trained
        trained_sh, frozen_sh = split_trained(shardings["params"])
        moving_sh = {**shardings, "params": trained_sh}

        def moving_step(moving: State, frozen: dict, batch: dict):
            state = {**moving, "params": join_trained(moving["params"], frozen)}
            new, metrics = step(state, batch)
            return {**new, "params": split_trained(new["params"])[0]}, metrics

        self._jitted = jax.jit(moving_step, in_shardings=(moving_sh, frozen_sh, batch_shardings),
                               out_shardings=(moving_sh, metrics_sharding), donate_argnums=0)

    def split(self, state: State) -> tuple[State, dict]:
        """(the state less its frozen parameters, the frozen parameters)."""
        trained, frozen = self._split_trained(state["params"])
        return {**state, "params": trained}, frozen

    def __call__(self, state: State, batch: dict) -> tuple[State, Any]:
        return _call(self._jitted, self.split(state), batch)

    def lower(self, state: State, batch: dict) -> "_Lowered":
        moving, frozen = self.split(state)
        return _Lowered(self._jitted.lower(moving, frozen, batch), self)


def _call(fn: Callable, parts: tuple[State, dict], batch: dict) -> tuple[State, Any]:
    moving, frozen = parts
    new, metrics = fn(moving, frozen, batch)
    return {**new, "params": join_trained(new["params"], frozen)}, metrics


class _Lowered:
    """A lowered `FrozenStep`: `compile()` gives an executable with the step's signature; the
    rest (`as_text`, `cost_analysis`, ...) is the lowered program's."""

    def __init__(self, lowered, step: FrozenStep):
        self._lowered, self._step = lowered, step

    def compile(self) -> "_Compiled":
        return _Compiled(self._lowered.compile(), self._step)

    def __getattr__(self, name: str):
        return getattr(self._lowered, name)


class _Compiled:
    """A compiled `FrozenStep`: called as `(state, batch)`; `memory_analysis`, `cost_analysis`,
    `as_text` are the executable's."""

    def __init__(self, compiled, step: FrozenStep):
        self._compiled, self._step = compiled, step

    def __call__(self, state: State, batch: dict) -> tuple[State, Any]:
        return _call(self._compiled, self._step.split(state), batch)

    def __getattr__(self, name: str):
        return getattr(self._compiled, name)
