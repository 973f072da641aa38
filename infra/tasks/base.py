"""The contract between a workload and the model-agnostic training loop."""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.section import Section

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class NoData(Section):
    """A task that reads no `data.*` keys."""

    prefix: ClassVar[str] = "data"


class Task(abc.ABC):
    """A workload: its model, its loss and metrics, and its data.

    The loop calls these and nothing else; it never looks inside a batch or a model.
    `loss_fn` and `eval_fn` run inside `jax.jit` and return scalar means over the batch.
    """

    #: What one example counts as in throughput figures (`tokens` for an LM, `examples` otherwise).
    unit: str = "examples"
    #: Eval metrics (keys of `summarize_eval`) shown in the progress bar and the CLI's last line.
    headline_metrics: tuple[str, ...] = ("loss",)
    #: The task's typed `data.*` section: its keys, their defaults (`infra.config` fills in the
    #: ones an experiment leaves out) and their checks (`infra.config.validate`).
    Data: ClassVar[type[Section]] = NoData
    #: Logical-axis rules for dimension names only this task's models use, appended after the
    #: config's `sharding.rules` (the first rule for a name wins, so a config rule overrides).
    logical_rules: ClassVar[tuple[tuple[str, Any], ...]] = ()
    #: Whether the loop makes each step's batch with `prepare` (RL tasks; timed as rollout).
    rolls_out: ClassVar[bool] = False
    #: Rows of the step's batch per example of the data's (GRPO: the completions per prompt).
    rows_per_example: int = 1
    #: Optimizer updates per training step on the step's batch (RL reuses its rollouts).
    updates_per_batch: int = 1

    def __init__(self, config):
        self.config = config
        if config is not None:  # its data section's checks, before anything is built
            _ = self.data_config

    @functools.cached_property
    def data_config(self) -> Section:
        """The config's `data` section, typed and checked (`Data`)."""
        return self.Data.from_config(self.config.data)

    @property
    def trainable(self):
        """An NNX filter of the parameters the run trains (and keeps optimizer state for);
        None = all of them. The others stay bit for bit as initialised or loaded (LoRA: only
        the adapters train, `nnx.LoRAParam`)."""
        return None

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh model; called under `nnx.eval_shape` and inside `jax.jit`."""

    @abc.abstractmethod
    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """(scalar loss to minimise, metrics) for one training batch."""

    def loss_weight(self, batch: Batch) -> jax.Array | None:
        """What `loss_fn`'s loss is a mean over in this (micro)batch, when that varies (SFT: its
        learnt tokens). With `train.microbatches` the microbatches' gradients and metrics are
        then averaged with these weights, so the update is exactly the whole batch's mean; None
        (default): equal weights, for losses that are means over equal-sized microbatches."""
        return None

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        """Outputs on one held-out batch; defaults to the training loss and metrics.

        Values may be scalars or per-example arrays (e.g. scores and labels for an AUC);
        `summarize_eval` turns the outputs of all held-out batches into the logged metrics.
        """
        loss, metrics = self.loss_fn(model, batch, jax.random.key(0))
        return {"loss": loss, **metrics}

    def summarize_eval(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """Metrics over the whole held-out set from every batch's `eval_fn` outputs (on the host).

        The default averages each scalar over batches; override it for metrics that do not
        decompose into batch means (AUC, MASE, masked means over a padded last batch).
        """
        return {k: float(np.mean([o[k] for o in outputs])) for k in outputs[0]}

    def prepare(self, batch: Batch, trainer, state) -> tuple[Batch, dict[str, float]]:
        """The global batch the step trains on, made from this process's data batch with the
        current state before each step, and host metrics to log with the step's (RL: rollouts
        of the policy, their rewards, the reference's log-probabilities). Called by the loop
        when `rolls_out`, timed as `rollout`. Default: the data batch as it is."""
        del state
        return trainer.to_global(batch), {}

    def evaluator(self, trainer, events=None):
        """A callable `params -> {metric: value}` replacing the jitted `eval_fn` over
        `eval_batches` (RL: sampling the held-out prompts); None (default): that one."""
        return None

    @abc.abstractmethod
    def train_iterator(self, process_index: int, process_count: int,
                       start_step: int = 0) -> Iterator[Batch]:
        """This process's share of each global training batch, as numpy arrays, starting with
        global batch `start_step` (how a run resumes on a different number of processes).

        The iterator must be checkpointable by grain (`get_state` / `set_state`).
        """

    @abc.abstractmethod
    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """This process's share of a fixed list of held-out global batches."""

    @abc.abstractmethod
    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        """Logical names of the leading dimensions of every batch array, e.g.
        `{"inputs": ("batch", "length")}`; the sharding rules turn them into shardings."""

    def units_per_example(self) -> int:
        """How many `unit`s one example holds (sequence length for an LM)."""
        return 1

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch (what `plan` compiles the step for, without
        data). Default: int32 (batch, units_per_example) for every key with two or more
        logical dims, (batch,) otherwise (an LM's `inputs` / `targets`); tasks whose batches
        hold other dtypes or shapes override it."""
        return {key: jax.ShapeDtypeStruct(
                    (batch_size, self.units_per_example()) if len(names) >= 2 else (batch_size,),
                    jnp.int32)
                for key, names in self.batch_axes().items()}
