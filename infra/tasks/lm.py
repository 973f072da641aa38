"""Language modelling: next-token cross-entropy on packed text (byte-level, or a real tokenizer).

Data: `data.files` tokenised in memory with `data.tokenizer` ("" = bytes; a tokenizer.json or
Hugging Face directory otherwise), or a corpus tokenised once with `python -m infra tokenize`
(`data.token_dir`, memory-mapped)."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra import models
from infra.data import pipeline, text
from infra.data.token_file import check_tokenizer, open_token_dir, tokenize_in_memory
from infra.data.tokenizer import load_tokenizer
from infra.errors import ConfigError
from infra.models import lora
from infra.section import Section
from infra.tasks.base import Batch, Metrics, Task


@dataclasses.dataclass(frozen=True)
class LMData(Section):
    prefix: ClassVar[str] = "data"

    files: str = ""  # glob(s), comma-separated; "" = the Python standard library's source
    seq_len: int = 128
    val_fraction: float = 0.05
    eval_batches: int = 4
    tokenizer: str = ""  # "" = byte-level; a tokenizer.json / HF model directory (infra.data.tokenizer)
    token_dir: str = ""  # a directory written by `python -m infra tokenize` (overrides data.files)

    def validate(self) -> None:
        self.positive("seq_len", "eval_batches")
        self.in_range("val_fraction", 0, 1, high_open=True)


class LanguageModelTask(Task):
    """Decoder-only LM over the files in `config.data.files` (default: the Python stdlib)."""

    unit = "tokens"
    Data = LMData

    def __init__(self, config):
        super().__init__(config)
        d = self.data_config
        vocab = self.tokenizer.vocab_size
        if config.model.vocab_size < vocab:
            kind = "byte-level" if not d.tokenizer else f"{d.tokenizer!r} tokenizer's"
            raise ConfigError(
                f"model.vocab_size={config.model.vocab_size} is smaller than the {kind} "
                f"vocabulary ({vocab})", key="model.vocab_size", value=-(-vocab // 128) * 128)
        if d.seq_len > config.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={d.seq_len} exceeds model.max_seq_len="
                f"{config.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
            )

    @functools.cached_property
    def tokenizer(self):
        """The run's tokenizer (`data.tokenizer`)."""
        return load_tokenizer(self.data_config.tokenizer)

    @functools.cached_property
    def corpus(self) -> tuple[np.ndarray, np.ndarray]:
        """(train tokens, held-out tokens), read once."""
        d = self.data_config
        if d.token_dir:
            index, arrays = open_token_dir(d.token_dir)
            check_tokenizer(index, d.tokenizer, d.token_dir)
            if index["vocab_size"] > self.config.model.vocab_size:
                raise ConfigError(f"data.token_dir {d.token_dir!r} holds ids up to "
                                  f"{index['vocab_size'] - 1} but model.vocab_size is "
                                  f"{self.config.model.vocab_size}", key="model.vocab_size",
                                  value=index["vocab_size"])
            return arrays["train"], arrays["val"]
        files = text.resolve_files(d.files)
        if d.tokenizer:
            return tokenize_in_memory(files, self.tokenizer, val_fraction=d.val_fraction,
                                      seed=self.config.train.seed, pattern=d.files or None)
        return text.load_corpus(
            files, val_fraction=d.val_fraction, seed=self.config.train.seed, pattern=d.files or None
        )

    #: adapters' rank dimension: never split (a, b are sharded along their weight's other axes)
    logical_rules = (("lora_rank", None),)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        model = models.build_model(self.config.model, rngs=rngs)
        if lora.enabled(self.config):  # finetune.lora.*: low-rank adapters on chosen weights
            c = lora.settings(self.config)
            lora.add_adapters(model, rank=c.rank, alpha=c.alpha, targets=c.targets,
                              key=rngs.params())
        return model

    @property
    def trainable(self):
        """LoRA runs train the adapters only; otherwise every parameter."""
        return nnx.LoRAParam if lora.enabled(self.config) else None

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # the model is deterministic
        losses, correct, router = model.token_losses(batch["inputs"], batch["targets"])
        return jnp.mean(losses) + router.loss, {"accuracy": jnp.mean(correct), **router.metrics}

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        """The held-out language-modelling loss (without the routers' auxiliary losses)."""
        losses, correct, router = model.token_losses(batch["inputs"], batch["targets"])
        return {"loss": jnp.mean(losses), "accuracy": jnp.mean(correct), **router.metrics}

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        return pipeline.train_iterator(
            self.corpus[0],
            seq_len=self.data_config.seq_len,
            global_batch_size=self.config.train.batch_size,
            seed=self.config.train.seed,
            process_index=process_index,
            process_count=process_count,
            start_step=start_step,
        )

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        return pipeline.eval_batches(
            self.corpus[1],
            seq_len=self.data_config.seq_len,
            global_batch_size=self.config.train.batch_size,
            num_batches=self.data_config.eval_batches,
            process_index=process_index,
            process_count=process_count,
        )

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        return {"inputs": ("batch", "length"), "targets": ("batch", "length")}

    def units_per_example(self) -> int:
        return self.data_config.seq_len

    def step_rows(self, batch_size: int) -> tuple[int, int]:
        """(sequences, tokens each) the transformer runs per training step (`plan`)."""
        return batch_size, self.data_config.seq_len
