"""GRPO (`task = "grpo"`): reinforcement learning with verifiable rewards on the serving engine.

Each step takes `train.batch_size` prompts, samples `rl.num_generations` completions of each
with the current policy (`infra.rl.rollout`: the engine in this process, its weights synced
from the trainer in memory), scores them with the reward functions (`rl.rewards`,
`infra.rl.rewards`), and makes the batch of prompt + completion rows with group-relative
advantages; the step then minimises the clipped-ratio objective with a KL penalty `rl.beta` to
the reference policy (`infra.rl.losses`, `infra.rl.reference`), `rl.num_iterations` updates
on the same rollouts (the ratio's old policy: the parameters that sampled them).

Data: `data.source = "arithmetic"` (addition problems generated in code, reward
`infra.data.arithmetic.exact_answer`) or JSONL prompts (`infra.data.prompts`). Eval: greedy
completions of `data.eval_prompts` held-out prompts, their mean rewards (`reward`,
`reward/<name>`: for exact-match rewards, the accuracy).

Rollouts depend only on the parameters, the prompts and seeds drawn from (`train.seed`, step),
so a run resumed from a checkpoint samples exactly what the uninterrupted run sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.config.sections import RLConfig
from infra.data import prompts, sft
from infra.data.arithmetic import ArithmeticKeys
from infra.data.batching import ArraySource, shuffled_batches
from infra.data.chat import run_template
from infra.errors import ConfigError, DataError, UserError
from infra.rl import losses, rewards
from infra.rl.reference import Scorer
from infra.rl.rollout import RolloutEngine
from infra.rl.sequences import completion_rows
from infra.tasks.base import Batch, Metrics, Task
from infra.tasks.lm import LanguageModelTask

SOURCES = ("jsonl", "arithmetic")
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class GRPOData(ArithmeticKeys):
    prefix: ClassVar[str] = "data"

    source: str = "jsonl"  # jsonl (data.train_files / eval_files) | arithmetic (generated)
    train_files: str = ""  # JSONL prompts: {"prompt" | "messages", ...fields for the rewards}
    eval_files: str = ""  # "" = hold out data.val_fraction of the training prompts
    val_fraction: float = 0.1
    prompt_len: int = 64  # prompts longer than this many tokens are left out
    eval_prompts: int = 64  # held-out prompts sampled (greedy) per evaluation; 0 = all
    tokenizer: str = ""  # "" = byte-level (init.from sets the source's)
    chat_template: str = ""  # a Jinja file overriding the tokenizer's chat template

    def validate(self) -> None:
        self.positive("prompt_len")
        self.validate_arithmetic()
        self.non_negative("eval_prompts", " (0 = every held-out prompt)")
        self.in_range("val_fraction", 0, 1, high_open=True)
        self.one_of("source", SOURCES)
        if self.source == "jsonl" and not self.train_files:
            raise ConfigError("data.train_files is empty; pass JSONL prompts (or set "
                              "data.source=arithmetic)", key="data.train_files",
                              value="'data/prompts.jsonl'", verb="e.g.")


class GRPOTask(LanguageModelTask):
    """Group-relative policy optimisation of a transformer LM with reward functions."""

    Data = GRPOData
    rolls_out = True
    headline_metrics = ("reward",)

    def __init__(self, config):
        Task.__init__(self, config)
        self.rl = RLConfig.from_config(config.rl)
        vocab = self.tokenizer.vocab_size
        if config.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({vocab})", key="model.vocab_size",
                              value=-(-vocab // 128) * 128)
        if self.rl.num_generations < 2:
            raise ConfigError("rl.num_generations must be >= 2 (advantages are relative to the "
                              "group)", key="rl.num_generations", value=8)
        if self.seq_len > config.model.max_seq_len:
            raise ConfigError(f"data.prompt_len + rl.max_new_tokens = {self.seq_len} exceeds "
                              f"model.max_seq_len={config.model.max_seq_len}; lower them")
        self.updates_per_batch = self.rl.num_iterations
        self.rows_per_example = self.rl.num_generations
        self._engine: RolloutEngine | None = None
        self._scorer: Scorer | None = None

    @property
    def seq_len(self) -> int:
        return self.data_config.prompt_len + self.rl.max_new_tokens

    @functools.cached_property
    def reward_fns(self) -> list[rewards.Reward]:
        spec = self.rl.rewards
        if not spec and self.data_config.source == "arithmetic":
            spec = "infra.data.arithmetic.exact_answer"
        return rewards.resolve(spec, self.config.experiment)

    # ----------------------------------------------------------------------- data

    @functools.cached_property
    def prompts(self) -> dict[str, tuple[list, list]]:
        """{"train" | "eval": (records, prompt ids)}, prompts over `data.prompt_len` left out."""
        d = self.data_config
        if d.source == "arithmetic":
            train, held = d.arithmetic_records(self.config.train.seed, d.val_fraction)
        else:
            train = sft.read_jsonl(sft.resolve(d.train_files, "data.train_files"), False)
            held = (sft.read_jsonl(sft.resolve(d.eval_files, "data.eval_files"), False)
                    if d.eval_files else None)
            if held is None:
                train, held = sft.split_by_hash(train, d.val_fraction, self.config.train.seed)
        template = run_template(self.config, self.tokenizer) if any(
            "messages" in r for _, _, r in train + held) else None
        out = {}
        for split, records in (("train", train), ("eval", held)):
            ids = prompts.encode(records, self.tokenizer, template)
            keep = [i for i, x in enumerate(ids) if 0 < len(x) <= d.prompt_len]
            if not keep:
                raise DataError(f"no {split} prompt fits data.prompt_len={d.prompt_len} tokens; "
                                "raise it", key="data.prompt_len", value=2 * d.prompt_len)
            if jax.process_index() == 0:
                print(f"grpo {split} prompts: {len(keep)} ({len(ids) - len(keep)} longer than "
                      f"data.prompt_len left out)", flush=True)
            out[split] = ([records[i][2] for i in keep], [ids[i] for i in keep])
        return out

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        n = len(self.prompts["train"][0])
        return shuffled_batches(ArraySource({"index": np.arange(n, dtype=np.int32)}),
                                global_batch_size=self.config.train.batch_size,
                                seed=self.config.train.seed, process_index=process_index,
                                process_count=process_count, start_step=start_step,
                                what="training prompts")

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        return []  # evaluation samples the held-out prompts (`evaluator`)

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        rows = ("batch", "length")
        return {**{k: rows for k in ROW_KEYS}, "old_logprobs": rows, "ref_logprobs": rows,
                "advantages": ("batch",)}

    def units_per_example(self) -> int:
        return self.rl.num_generations * self.seq_len

    def step_rows(self, batch_size: int) -> tuple[int, int]:
        return batch_size * self.rl.num_generations, self.seq_len

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        n, t = batch_size * self.rl.num_generations, self.seq_len
        ints, floats = jnp.int32, jnp.float32
        return {**{k: jax.ShapeDtypeStruct((n, t), floats if k == "loss_mask" else ints)
                   for k in ROW_KEYS},
                "old_logprobs": jax.ShapeDtypeStruct((n, t), floats),
                "ref_logprobs": jax.ShapeDtypeStruct((n, t), floats),
                "advantages": jax.ShapeDtypeStruct((n,), floats)}

    # ----------------------------------------------------------------------- rollouts

    def engine(self, trainer) -> RolloutEngine:
        """The rollout engine on the trainer's devices (built once)."""
        if self._engine is None:
            if jax.process_count() > 1:
                raise UserError("task grpo runs in one process (its rollout engine is not "
                                "multi-host yet); run it on one host")
            rows = self.config.train.batch_size * self.rl.num_generations
            self._engine = RolloutEngine(self.config, trainer.mesh.devices.flat, self.tokenizer,
                                         slots=self.rl.slots or rows, max_len=self.seq_len)
        return self._engine

    def rollout(self, trainer, params: dict, records: list[dict], ids: list[np.ndarray],
                seeds: np.ndarray, *, greedy: bool = False) -> dict:
        """Sync `params` into the engine and sample one completion per (prompt, seed):
        {"completions", "texts", "rewards", "reward_means", "seconds"}."""
        engine = self.engine(trainer)
        engine.sync(params)
        t0, tokens0 = engine.seconds, engine.tokens
        done = engine.sample(ids, seeds, max_tokens=self.rl.max_new_tokens,
                             temperature=0.0 if greedy else self.rl.temperature,
                             top_k=self.rl.top_k)
        eos = self.tokenizer.eos_id
        texts = [self.tokenizer.decode(c.ids[:-1] if c.stopped and eos is not None else c.ids)
                 for c in done]
        total, means = rewards.score(self.reward_fns, [prompts.prompt_of(r) for r in records],
                                     texts, prompts.columns(records))
        return {"completions": done, "texts": texts, "rewards": total, "reward_means": means,
                "seconds": engine.seconds - t0, "tokens": engine.tokens - tokens0}

    def prepare(self, batch: Batch, trainer, state) -> tuple[Batch, dict[str, float]]:
        g = self.rl.num_generations
        step = int(state["step"])
        records, ids = self.prompts["train"]
        index = np.repeat(np.asarray(batch["index"]), g)
        seeds = np.random.default_rng([self.config.train.seed, step]).integers(
            0, 2**31 - 1, size=len(index))
        chosen = [records[i] for i in index]
        prompt_ids = [ids[i] for i in index]
        out = self.rollout(trainer, state["params"], chosen, prompt_ids, seeds)
        completions = out["completions"]
        rows = completion_rows(prompt_ids, [c.ids for c in completions], self.seq_len,
                               self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0)
        rows["advantages"] = losses.group_advantages(out["rewards"], g, self.rl.scale_rewards)
        zeros = np.zeros_like(rows["loss_mask"])
        rows["old_logprobs"], rows["ref_logprobs"] = zeros, zeros
        placed = trainer.to_global(rows)
        if self._scorer is None:
            self._scorer = Scorer(trainer)
        if self.rl.num_iterations > 1:  # the policy that sampled them (exactly, not the engine's)
            placed["old_logprobs"] = self._scorer(state["params"], placed)
        if self.rl.beta > 0:
            placed["ref_logprobs"] = self._scorer.reference(state["params"], placed)
        lengths = np.array([len(c.ids) for c in completions], np.float64)
        grouped = out["rewards"].reshape(-1, g)
        return placed, {"reward": float(out["rewards"].mean()),
                        "reward_group_std": float(grouped.std(axis=1, ddof=1).mean()),
                        **out["reward_means"],
                        "completion_length": float(lengths.mean()),
                        "stopped_fraction": float(np.mean([c.stopped for c in completions])),
                        "rollout_tokens_per_sec": out["tokens"] / max(out["seconds"], 1e-9)}

    # ----------------------------------------------------------------------- loss

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        nll, _, router = model.token_losses(batch["inputs"], batch["targets"],
                                            positions=batch["positions"],
                                            segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"]
        logp = jnp.where(mask > 0, -nll, 0.0)
        old = (jax.lax.stop_gradient(logp) if self.rl.num_iterations == 1
               else batch["old_logprobs"])
        loss, metrics = losses.grpo_objective(
            logp, old, batch["ref_logprobs"], batch["advantages"], mask,
            epsilon=self.rl.epsilon, beta=self.rl.beta, averaging=self.rl.loss_averaging)
        return loss + router.loss, {**metrics, "completion_tokens": jnp.sum(mask),
                                    **router.metrics}

    def loss_weight(self, batch: Batch) -> jax.Array:
        """Microbatches weigh by completion tokens (token averaging) or sequences."""
        mask = batch["loss_mask"]
        if self.rl.loss_averaging == "token":
            return jnp.sum(mask)
        return jnp.sum((jnp.sum(mask, axis=1) > 0).astype(jnp.float32))

    # ----------------------------------------------------------------------- eval

    def evaluator(self, trainer, events=None):
        records, ids = self.prompts["eval"]
        n = self.data_config.eval_prompts or len(records)
        records, ids = records[:n], ids[:n]

        def evaluate(params: dict) -> dict[str, float]:
            t0 = time.perf_counter()
            out = self.rollout(trainer, params, records, ids, np.zeros(len(ids), np.int64),
                               greedy=True)
            lengths = [len(c.ids) for c in out["completions"]]
            if events is not None:
                events.record("eval", seconds=time.perf_counter() - t0)
            return {"reward": float(out["rewards"].mean()), **out["reward_means"],
                    "completion_length": float(np.mean(lengths)), "prompts": float(len(ids))}

        return evaluate
