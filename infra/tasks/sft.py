"""Supervised fine-tuning (`task = "sft"`): next-token loss on the assistant / completion tokens
of JSONL examples only, optionally packed, full or LoRA (`finetune.lora.*`).

Data (`infra/data/sft.py`): `data.train_files` (and `data.eval_files`, else `data.val_fraction`
of the training examples held out), or `data.source = "stdlib_docstrings"`: "write the docstring
of this function" built once from the Python standard library (`infra/data/docstrings.py`), or
`"arithmetic"`: addition problems generated in code (`infra/data/arithmetic.py`).
The model and tokenizer are usually another run's or a Hugging Face model's (`init.from`).

Loss: the mean cross-entropy over the learnt tokens of the batch (the per-token `loss_mask`;
every other token contributes exactly zero), i.e. sum(mask * nll) / sum(mask). With
`train.microbatches = k` the microbatches are weighted by their learnt tokens (`loss_weight`), so
the update is still the whole batch's mean. Eval reports `loss` (nats per learnt token) and `accuracy` over every learnt token of
the held-out examples, summed over all batches before dividing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.data import docstrings, sft
from infra.data.arithmetic import ArithmeticKeys
from infra.data.batching import held_out_batches, shuffled_batches
from infra.data.chat import run_template
from infra.errors import ConfigError, DataError
from infra.models.moe import RouterTerms
from infra.tasks.base import Batch, Metrics, Task
from infra.tasks.lm import LanguageModelTask

SOURCES = ("jsonl", "stdlib_docstrings", "arithmetic")


@dataclasses.dataclass(frozen=True)
class SFTData(ArithmeticKeys):
    prefix: ClassVar[str] = "data"

    source: str = "jsonl"  # jsonl (data.train_files / eval_files) | stdlib_docstrings (no download)
    train_files: str = ""  # JSONL glob(s), comma-separated
    eval_files: str = ""  # "" = hold out data.val_fraction of the training examples
    val_fraction: float = 0.1  # held-out share (of examples, or of modules for stdlib_docstrings)
    seq_len: int = 256  # tokens per row
    packing: bool = True  # several examples per row (segment-masked attention)
    overlong: str = "truncate"  # examples longer than seq_len: "truncate" or "drop"
    eval_batches: int = 0  # 0 = every held-out example once; N = the first N batches
    tokenizer: str = ""  # "" = byte-level (init.from sets the source's)
    chat_template: str = ""  # a Jinja file overriding the tokenizer's chat template
    docstrings_format: str = "completion"  # stdlib_docstrings as "completion" or "chat" examples
    cache_dir: str = ""  # where stdlib_docstrings is written ("" = $INFRA_CACHE_DIR or ~/.cache/infra)

    def validate(self) -> None:
        self.positive("seq_len")
        self.validate_arithmetic()
        if self.eval_batches < 0:
            raise ConfigError(f"data.eval_batches must be >= 0 (0 = every held-out example), "
                              f"got {self.eval_batches}", key="data.eval_batches", value=0)
        self.in_range("val_fraction", 0, 1, high_open=True)
        self.one_of("source", SOURCES)
        self.one_of("overlong", sft.OVERLONG)
        self.one_of("docstrings_format", ("completion", "chat"))
        if self.source == "jsonl" and not self.train_files:
            raise ConfigError("data.train_files is empty; pass JSONL files of examples (or set "
                              "data.source=stdlib_docstrings)", key="data.train_files",
                              value="'data/train.jsonl'", verb="e.g.")


class SFTTask(LanguageModelTask):
    """Fine-tune a transformer LM on prompt -> response examples."""

    Data = SFTData

    def __init__(self, config):
        Task.__init__(self, config)
        d = self.data_config
        vocab = self.tokenizer.vocab_size
        if config.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({vocab})", key="model.vocab_size",
                              value=-(-vocab // 128) * 128)
        if d.seq_len > config.model.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len="
                              f"{config.model.max_seq_len}; lower data.seq_len or raise "
                              f"model.max_seq_len")

    # ----------------------------------------------------------------------- data

    @functools.cached_property
    def chat_template(self) -> str:
        return run_template(self.config, self.tokenizer)

    def _records(self) -> tuple[list, list]:
        d = self.data_config
        if d.source == "stdlib_docstrings":
            directory = docstrings.default_directory(d.cache_dir, d.val_fraction,
                                                     d.docstrings_format)
            train, val = docstrings.build(directory, val_fraction=d.val_fraction,
                                          fmt=d.docstrings_format)
            if jax.process_index() == 0:
                print(f"sft data: {directory} (stdlib docstrings)", flush=True)
            return sft.read_jsonl([str(train)]), sft.read_jsonl([str(val)])
        if d.source == "arithmetic":
            return d.arithmetic_records(self.config.train.seed, d.val_fraction)
        records = sft.read_jsonl(sft.resolve(d.train_files, "data.train_files"))
        if d.eval_files:
            return records, sft.read_jsonl(sft.resolve(d.eval_files, "data.eval_files"))
        return sft.split_by_hash(records, d.val_fraction, self.config.train.seed)

    @functools.cached_property
    def data(self) -> dict:
        """{"train": Rows, "eval": Rows, "stats": {split: Stats}}, built once."""
        d, tok = self.data_config, self.tokenizer
        train, held = self._records()
        if not train:
            raise DataError("no training examples; add lines to data.train_files")
        if not held:
            raise DataError("no held-out examples; pass data.eval_files or raise "
                            "data.val_fraction", key="data.val_fraction", value=0.1)
        pad = tok.pad_id if tok.pad_id is not None else 0
        out: dict = {"stats": {}}
        for split, records, seed in (("train", train, self.config.train.seed),
                                     ("eval", held, None)):
            examples, stats = sft.fit(sft.encode(records, tok, self.chat_template), d.seq_len,
                                      d.overlong)
            if not len(examples):
                raise DataError(f"no {split} example has anything to learn within data.seq_len="
                                f"{d.seq_len}; raise data.seq_len", key="data.seq_len",
                                value=2 * d.seq_len)
            # held-out examples are always packed: the same loss, fewer batches
            out[split] = sft.make_rows(examples, stats, seq_len=d.seq_len,
                                       packing=d.packing or split == "eval", seed=seed,
                                       pad_id=pad)
            out["stats"][split] = stats
            if jax.process_index() == 0:  # stdout, like the sharding table: stderr is for errors
                print(stats.describe(split, d.seq_len, d.packing or split == "eval"), flush=True)
        return out

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        return shuffled_batches(self.data["train"], global_batch_size=self.config.train.batch_size,
                                seed=self.config.train.seed, process_index=process_index,
                                process_count=process_count, start_step=start_step, mask=True,
                                what="training (rows of data.seq_len)")

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        n = self.data_config.eval_batches
        batches = held_out_batches(self.data["eval"],
                                   global_batch_size=self.config.train.batch_size,
                                   process_index=process_index, process_count=process_count,
                                   num_batches=n or None, what="held-out (rows of data.seq_len)")
        return [b if "mask" in b else {**b, "mask": np.ones(len(b["inputs"]), np.float32)}
                for b in batches]

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        rows = ("batch", "length")
        return {"inputs": rows, "targets": rows, "loss_mask": rows, "segment_ids": rows,
                "positions": rows, "mask": ("batch",)}

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        t = self.data_config.seq_len
        ints = jax.ShapeDtypeStruct((batch_size, t), jnp.int32)
        return {"inputs": ints, "targets": ints, "segment_ids": ints, "positions": ints,
                "loss_mask": jax.ShapeDtypeStruct((batch_size, t), jnp.float32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

    # ----------------------------------------------------------------------- loss

    @staticmethod
    def token_losses(model: nnx.Module, batch: Batch
                     ) -> tuple[jax.Array, jax.Array, jax.Array, RouterTerms]:
        """(per-token nll, per-token correct, per-token weight) of a batch, and the routers'
        loss terms (mixture-of-experts models; over every position of the packed rows); the
        weight is the loss mask (times the row's `mask`: 0 on the held-out set's padding
        rows)."""
        nll, correct, router = model.token_losses(batch["inputs"], batch["targets"],
                                                  positions=batch["positions"],
                                                  segment_ids=batch["segment_ids"])
        weight = batch["loss_mask"]
        if "mask" in batch:
            weight = weight * batch["mask"][:, None]
        # `where`, not only a product: a masked token contributes exactly zero (even if its
        # nll were not finite) and gets exactly zero gradient
        return jnp.where(weight > 0, nll, 0.0), correct, weight, router

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        nll, correct, weight, router = self.token_losses(model, batch)
        count = jnp.sum(weight)
        denominator = jnp.maximum(count, 1.0)
        return jnp.sum(nll * weight) / denominator + router.loss, {
            "accuracy": jnp.sum(correct * weight) / denominator, "loss_tokens": count,
            **router.metrics}

    def loss_weight(self, batch: Batch) -> jax.Array:
        """The learnt tokens: microbatches are weighted by them (one mean over the batch)."""
        weight = batch["loss_mask"]
        if "mask" in batch:
            weight = weight * batch["mask"][:, None]
        return jnp.sum(weight)

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        nll, correct, weight, _ = self.token_losses(model, batch)
        return {"nll_sum": jnp.sum(nll * weight), "correct_sum": jnp.sum(correct * weight),
                "tokens": jnp.sum(weight)}

    def summarize_eval(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """Loss and accuracy over every learnt held-out token (sums over batches, then divided)."""
        total = {k: float(np.sum([np.asarray(o[k], np.float64) for o in outputs]))
                 for k in ("nll_sum", "correct_sum", "tokens")}
        if total["tokens"] == 0:
            raise DataError("the held-out batches hold no learnt tokens")
        return {"loss": total["nll_sum"] / total["tokens"],
                "accuracy": total["correct_sum"] / total["tokens"], "tokens": total["tokens"]}
