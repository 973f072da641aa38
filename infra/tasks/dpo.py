"""DPO (`task = "dpo"`): direct preference optimisation on pairs of completions.

Data (`infra/data/preferences.py`): JSONL `{"prompt" | "messages", "chosen", "rejected"}` in
`data.train_files` (and `data.eval_files`, else `data.val_fraction` held out), or
`data.source = "arithmetic"`: sums chosen over near misses, generated in code. Each step scores
both completions of every pair under the policy and under the reference (before the step, in
`prepare`: the base weights of a LoRA policy, else `init.from`'s parameters; `infra.rl.reference`)
and minimises -log sigmoid(beta * ((pc - rc) - (pr - rr))) (`infra.rl.losses.dpo_objective`,
`rl.beta`). Full fine-tuning or LoRA (`finetune.lora.*`). Eval: the loss, the preference
accuracy (chosen's implicit reward above rejected's) and the mean margin over every held-out
pair.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.config.sections import RLConfig
from infra.data import preferences, sft
from infra.data.arithmetic import ArithmeticKeys
from infra.data.batching import ArraySource, held_out_batches, shuffled_batches
from infra.data.chat import run_template
from infra.errors import ConfigError, DataError
from infra.loop.evaluator import Evaluator
from infra.rl import losses
from infra.rl.reference import Scorer
from infra.tasks.base import Batch, Metrics, Task
from infra.tasks.lm import LanguageModelTask

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DPOData(ArithmeticKeys):
    prefix: ClassVar[str] = "data"

    source: str = "jsonl"  # jsonl (data.train_files / eval_files) | arithmetic (generated)
    train_files: str = ""  # JSONL preference pairs
    eval_files: str = ""  # "" = hold out data.val_fraction of the training pairs
    val_fraction: float = 0.1
    seq_len: int = 256  # tokens per row (prompt + the longer completion); longer pairs left out
    eval_batches: int = 0  # 0 = every held-out pair once; N = the first N batches
    tokenizer: str = ""  # "" = byte-level (init.from sets the source's)
    chat_template: str = ""  # a Jinja file overriding the tokenizer's chat template

    def validate(self) -> None:
        self.positive("seq_len")
        self.validate_arithmetic()
        self.one_of("source", ("jsonl", "arithmetic"))
        self.non_negative("eval_batches", " (0 = every held-out pair)")
        self.in_range("val_fraction", 0, 1, high_open=True)
        if self.source == "jsonl" and not self.train_files:
            raise ConfigError("data.train_files is empty; pass JSONL preference pairs (or set "
                              "data.source=arithmetic)",
                              key="data.train_files", value="'data/pairs.jsonl'", verb="e.g.")


class DPOTask(LanguageModelTask):
    """Preference optimisation of a transformer LM against its reference."""

    Data = DPOData
    rolls_out = True  # the reference's log-probabilities, before each step

    def __init__(self, config):
        Task.__init__(self, config)
        self.rl = RLConfig.from_config(config.rl)
        if not self.rl.beta > 0:
            raise ConfigError("rl.beta must be > 0 for DPO (0.1 is usual)", key="rl.beta",
                              value=0.1)
        vocab = self.tokenizer.vocab_size
        if config.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({vocab})", key="model.vocab_size",
                              value=-(-vocab // 128) * 128)
        if self.data_config.seq_len > config.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data_config.seq_len} exceeds "
                              f"model.max_seq_len={config.model.max_seq_len}; lower it")
        self._scorer: Scorer | None = None

    @functools.cached_property
    def pairs(self) -> dict[str, dict[str, np.ndarray]]:
        """{"train" | "eval": arrays (pairs, 2, seq_len)}, read once."""
        d = self.data_config
        if d.source == "arithmetic":
            train, held = d.arithmetic_pairs(self.config.train.seed, d.val_fraction)
        else:
            train, held = self._jsonl()
        return self._rows(train, held)

    def _jsonl(self) -> tuple[list, list]:
        d = self.data_config
        train = sft.read_jsonl(sft.resolve(d.train_files, "data.train_files"), False)
        if d.eval_files:
            held = sft.read_jsonl(sft.resolve(d.eval_files, "data.eval_files"), False)
        else:
            train, held = sft.split_by_hash(train, d.val_fraction, self.config.train.seed)
        return train, held

    def _rows(self, train: list, held: list) -> dict[str, dict[str, np.ndarray]]:
        d = self.data_config
        template = run_template(self.config, self.tokenizer) if any(
            "messages" in r for _, _, r in train + held) else None
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out = {}
        for split, records in (("train", train), ("eval", held)):
            rows, dropped = preferences.pair_rows(records, self.tokenizer, template, d.seq_len,
                                                  pad)
            if not len(rows["inputs"]):
                raise DataError(f"no {split} preference pair fits data.seq_len={d.seq_len}; "
                                "raise it (or add pairs)", key="data.seq_len",
                                value=2 * d.seq_len)
            if jax.process_index() == 0:
                print(f"dpo {split} pairs: {len(rows['inputs'])} ({dropped} longer than "
                      f"data.seq_len left out)", flush=True)
            out[split] = rows
        return out

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        return shuffled_batches(ArraySource(self.pairs["train"]),
                                global_batch_size=self.config.train.batch_size,
                                seed=self.config.train.seed, process_index=process_index,
                                process_count=process_count, start_step=start_step,
                                mask=True, what="training (preference pairs)")

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        n = self.data_config.eval_batches
        batches = held_out_batches(ArraySource(self.pairs["eval"]),
                                   global_batch_size=self.config.train.batch_size,
                                   process_index=process_index, process_count=process_count,
                                   num_batches=n or None, what="held-out preference pairs")
        return [b if "mask" in b else {**b, "mask": np.ones(len(b["inputs"]), np.float32)}
                for b in batches]

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        pairs = ("batch", None, "length")
        return {**{k: pairs for k in ROW_KEYS}, "ref_logprobs": pairs, "mask": ("batch",)}

    def units_per_example(self) -> int:
        return 2 * self.data_config.seq_len

    def step_rows(self, batch_size: int) -> tuple[int, int]:
        return 2 * batch_size, self.data_config.seq_len

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, 2, self.data_config.seq_len)
        return {**{k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32)
                   for k in ROW_KEYS},
                "ref_logprobs": jax.ShapeDtypeStruct(shape, jnp.float32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

    # ----------------------------------------------------------------------- reference

    def prepare(self, batch: Batch, trainer, state) -> tuple[Batch, dict[str, float]]:
        """The global batch with the reference's per-token log-probabilities."""
        local = {**batch, "ref_logprobs": np.zeros(batch["loss_mask"].shape, np.float32)}
        placed = trainer.to_global(local)
        if self._scorer is None:
            self._scorer = Scorer(trainer)
        placed["ref_logprobs"] = self._scorer.reference(state["params"], placed)
        return placed, {}

    def evaluator(self, trainer, events=None):
        return _ReferencedEvaluator(self, trainer, events)

    # ----------------------------------------------------------------------- loss

    def sequence_logprobs(self, model: nnx.Module, batch: Batch):
        """(policy's, reference's) log-probability of each completion (pairs, 2), and the
        routers' terms."""
        shape = batch["inputs"].shape
        rows = {k: batch[k].reshape(-1, shape[-1]) for k in ROW_KEYS}
        nll, _, router = model.token_losses(rows["inputs"], rows["targets"],
                                            positions=rows["positions"],
                                            segment_ids=rows["segment_ids"])
        mask = batch["loss_mask"]
        logp = jnp.where(mask > 0, -nll.reshape(shape), 0.0)
        return jnp.sum(logp * mask, -1), jnp.sum(batch["ref_logprobs"] * mask, -1), router

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        policy, ref, router = self.sequence_logprobs(model, batch)
        loss, metrics = losses.dpo_objective(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                             beta=self.rl.beta, weight=batch["mask"])
        return loss + router.loss, {**metrics, **router.metrics}

    def loss_weight(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["mask"])

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        policy, ref, _ = self.sequence_logprobs(model, batch)
        w = batch["mask"]
        loss, m = losses.dpo_objective(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                       beta=self.rl.beta, weight=w)
        count = jnp.sum(w)
        return {"loss_sum": loss * count, "accuracy_sum": m["reward_accuracy"] * count,
                "margin_sum": m["reward_margin"] * count, "pairs": count}

    def summarize_eval(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        total = {k: float(np.sum([np.asarray(o[k], np.float64) for o in outputs]))
                 for k in ("loss_sum", "accuracy_sum", "margin_sum", "pairs")}
        n = max(total["pairs"], 1.0)
        return {"loss": total["loss_sum"] / n, "reward_accuracy": total["accuracy_sum"] / n,
                "reward_margin": total["margin_sum"] / n, "pairs": total["pairs"]}


class _ReferencedEvaluator(Evaluator):
    """The jitted eval step over held-out batches that carry the reference's scores, computed
    at the first evaluation (the reference does not change)."""

    def __init__(self, task: DPOTask, trainer, events=None):
        super().__init__(task, trainer.eval_step, [], events)
        self.trainer = trainer

    def __call__(self, params) -> dict[str, float]:
        if not self.batches:
            local = self.task.eval_batches(jax.process_index(), jax.process_count())
            self.batches = [self.task.prepare(b, self.trainer, {"params": params})[0]
                            for b in local]
        return super().__call__(params)
