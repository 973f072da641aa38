"""Image classification: softmax cross-entropy, top-1 accuracy exact over the whole held-out split."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from infra import models
from infra.data.batching import ArraySource, held_out_batches, shuffled_batches
from infra.data.images import ImageSplits, load_splits, shift_and_noise
from infra.errors import ConfigError, DataError
from infra.section import Section
from infra.tasks.base import Batch, Metrics, Task


@dataclasses.dataclass(frozen=True)
class ImageData(Section):
    """Shifts (in pixels of the model's image_size) move no ink off the canvas: digit strokes
    touch the top and bottom rows. Noise is in standardised pixel units."""

    prefix: ClassVar[str] = "data"

    source: str = "digits"  # digits (bundled), a .npz file or a folder of class subfolders
    test_fraction: float = 0.2
    split_seed: int = 0
    max_shift: int = 2
    noise_std: float = 0.25
    keep_content: bool = True

    def validate(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}",
                              key="data.test_fraction", value="0.2")
        if not self.source:
            raise ConfigError("data.source is empty", key="data.source", value="digits",
                              verb="pass", note=", a .npz file or a folder of class subfolders")
        if self.max_shift < 0:
            raise ConfigError(f"data.max_shift must be an integer >= 0 (pixels), got "
                              f"{self.max_shift}", key="data.max_shift", value=1,
                              note=" (0 = no shifts)")
        if not self.noise_std >= 0:
            raise ConfigError(f"data.noise_std must be >= 0, got {self.noise_std}",
                              key="data.noise_std", value=0.1, note=" (0 = no noise)")


class ImageClassificationTask(Task):
    """Classify `config.data.source` (digits, a .npz or a folder of class subfolders) into
    `config.model.num_classes` classes; batches are {"image", "label", "mask"}."""

    unit = "examples"
    headline_metrics = ("accuracy", "loss")
    Data = ImageData
    # Flattened patch pixels, conv kernel / channels, output classes.
    logical_rules = (("patch", None), ("conv_in", None), ("conv_out", "tensor"),
                     ("kernel", None), ("classes", None))

    def __init__(self, config):
        super().__init__(config)
        d, m = self.data_config, config.model
        for key in ("image_size", "channels", "num_classes"):
            if key not in m:
                raise ConfigError(f"model {m.get('name')!r} has no model.{key}; task 'image' "
                                  "needs an image model", key="model.name", value="vit",
                                  note=" (or convnet)")
        if m.channels not in (1, 3):
            raise ConfigError(f"model.channels must be 1 (grey) or 3 (RGB), got {m.channels}")
        if d.source != "digits" and not Path(d.source).expanduser().exists():  # fail before compiling
            raise DataError(f"data.source '{d.source}' does not exist", key="data.source",
                            value="digits", verb="pass",
                            note=", a .npz file or a folder of class subfolders")

    @functools.cached_property
    def data(self) -> ImageSplits:
        """The standardised train / held-out split, read once."""
        d, m = self.data_config, self.config.model
        splits = load_splits(d.source, size=m.image_size, channels=m.channels,
                             test_fraction=d.test_fraction, split_seed=d.split_seed)
        top = int(max(splits.train_labels.max(), splits.test_labels.max()))
        if top >= m.num_classes:
            raise ConfigError(f"data.source '{d.source}' has labels up to {top} but "
                              f"model.num_classes={m.num_classes}", key="model.num_classes",
                              value=top + 1)
        return splits

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return models.build_model(self.config.model, rngs=rngs)

    def _per_example(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
        logits = model(batch["image"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return losses, correct

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # augmentation happens in the input pipeline; the models are deterministic
        losses, correct = self._per_example(model, batch)
        mask = batch["mask"]
        count = jnp.maximum(jnp.sum(mask), 1.0)
        return jnp.sum(losses * mask) / count, {"accuracy": jnp.sum(correct * mask) / count}

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        losses, correct = self._per_example(model, batch)
        return {"loss": losses, "correct": correct, "mask": batch["mask"]}

    def summarize_eval(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """Loss and top-1 accuracy over every real held-out example (padding has mask 0)."""
        cat = {k: np.concatenate([np.asarray(o[k], np.float64).reshape(-1) for o in outputs])
               for k in ("loss", "correct", "mask")}
        count = cat["mask"].sum()
        if count == 0:
            raise DataError("the held-out batches hold no examples (every mask is 0)")
        return {"accuracy": float((cat["correct"] * cat["mask"]).sum() / count),
                "loss": float((cat["loss"] * cat["mask"]).sum() / count),
                "examples": float(count)}

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        d, splits = self.data_config, self.data
        source = ArraySource({"image": splits.train_images, "label": splits.train_labels})
        return shuffled_batches(
            source, global_batch_size=self.config.train.batch_size, seed=self.config.train.seed,
            process_index=process_index, process_count=process_count, start_step=start_step,
            augment=(shift_and_noise(d.max_shift, d.noise_std, splits.fill, keep_content=d.keep_content)
                     if self.augments else None),
            mask=True,
        )

    @property
    def augments(self) -> bool:
        return bool(self.data_config.max_shift or self.data_config.noise_std)

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        splits = self.data
        source = ArraySource({"image": splits.test_images, "label": splits.test_labels})
        return held_out_batches(source, global_batch_size=self.config.train.batch_size,
                                process_index=process_index, process_count=process_count,
                                num_batches=None)

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch, without reading data (for `infra plan`)."""
        m = self.config.model
        return {"image": jax.ShapeDtypeStruct((batch_size, m.image_size, m.image_size, m.channels),
                                              jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        return {"image": ("batch",), "label": ("batch",), "mask": ("batch",)}
