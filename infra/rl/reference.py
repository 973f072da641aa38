"""Per-token log-probabilities of a policy, and the reference policy of GRPO's KL and DPO.

The reference is the model the post-training started from. With LoRA it is the base weights
themselves: the policy's parameters with every adapter zeroed (b = 0 adds exactly nothing), no
second copy. Full fine-tuning keeps the starting parameters (`init.from`'s) on the devices
beside the policy, as the reference model of the other RL libraries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infra import sharding
from infra.errors import ConfigError
from infra.interop import init_from
from infra.models import lora


def token_logprobs(model, batch: dict) -> jax.Array:
    """log p(target) at every position of the rows (batch, length), float32; MoE router terms
    are dropped (a score, not a loss)."""
    nll, _, _ = model.token_losses(batch["inputs"], batch["targets"],
                                   positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
    return -nll


def without_adapters(params: dict) -> dict:
    """`params` with every LoRA adapter zeroed: the base model's outputs."""
    base, adapters = lora.split(params)
    return lora.join(base, jax.tree.map(jnp.zeros_like, adapters))


class Scorer:
    """`scorer(params, batch)`: per-token log-probabilities of the batch's rows (shaped like
    its `inputs`), jitted with the trainer's shardings; `reference(params, batch)`: the same
    under the reference policy."""

    def __init__(self, trainer, keys: tuple[str, ...] = ("inputs", "targets", "positions",
                                                          "segment_ids")):
        self.trainer, self.keys = trainer, keys
        merge, mesh, rules = trainer.state.model.merge, trainer.mesh, trainer.rules

        def score(params: dict, batch: dict, base: bool) -> jax.Array:
            shape = batch["inputs"].shape  # rows, or (pairs, 2, length): scored as rows
            rows = {k: v.reshape(-1, shape[-1]) for k, v in batch.items()}
            with sharding.activation_rules(mesh, rules):
                model = merge(without_adapters(params) if base else params)
                return token_logprobs(model, rows).reshape(shape)

        self._score = jax.jit(score, static_argnums=2,
                              out_shardings=trainer.batch_shardings["inputs"])
        self._lora = lora.enabled(trainer.config)
        self._reference: dict | None = None

    def __call__(self, params: dict, batch: dict) -> jax.Array:
        return self._score(params, {k: batch[k] for k in self.keys}, False)

    def reference(self, params: dict, batch: dict) -> jax.Array:
        """Log-probabilities under the reference: the base of a LoRA policy, else the
        parameters of `init.from` (loaded once)."""
        if self._lora:
            return self._score(params, {k: batch[k] for k in self.keys}, True)
        if self._reference is None:
            self._reference = self._load_reference()
        return self(self._reference, batch)

    def _load_reference(self) -> dict:
        config = self.trainer.config
        source = init_from.source_of(config)
        if not source:
            raise ConfigError("rl.beta > 0 with full fine-tuning needs the reference model: set "
                              "init.from (the model post-training starts from), or use LoRA "
                              "(finetune.lora.rank: the reference is the base weights)",
                              key="init.from", value="<a workdir or HF model directory>")
        return init_from.load_params(source, config, self.trainer.state.abstract["params"])
