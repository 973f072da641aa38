"""Click-through-rate prediction: a DLRM on the synthetic click log of `infra.data.clicks`.

Batches: `dense` (B, 13) float32 `log1p(count)` (the usual DLRM preprocessing), `ids` (B, 26)
int32 per-feature ids, `label` (B,) float32 clicks, `mask` (B,) (0 on the padding of the last
held-out batch). Training minimises the mean binary cross-entropy of the logit. Evaluation
covers every held-out example once and reports, over the whole set, the exact AUC (rank-based
Mann–Whitney, ties averaged) and log-loss, next to the same two metrics of the ground-truth
click probabilities on the same examples (`bayes_auc`, `bayes_logloss`: the best any model can
reach) and `auc_gap = bayes_auc - auc`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from infra import models
from infra.data import clicks
from infra.data.batching import ArraySource, held_out_batches, shuffled_batches
from infra.tasks.base import Batch, Metrics, Task

def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann–Whitney U statistic with tied scores given their
    average rank, divided by (#positives × #negatives). NaN if either class is absent."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    first = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]  # start of each tie group
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, scores.size])
    group_rank = starts + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(scores.size)
    ranks[order] = group_rank[np.cumsum(first) - 1]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (nats) of click probabilities, clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _inputs(split: dict[str, np.ndarray]) -> ArraySource:
    return ArraySource({
        "dense": np.log1p(split["dense"]).astype(np.float32),
        "ids": split["ids"],
        "label": split["label"],
    })


class ClickThroughTask(Task):
    """DLRM click-through prediction on the synthetic Criteo-like click log."""

    unit = "examples"
    headline_metrics = ("auc", "logloss")
    Data = clicks.ClickSpec
    # Embedding-table rows are split over every mesh axis (row-wise sharding, how tables larger
    # than one device are spread); lookups gather across devices.
    logical_rules = (("table_rows", ("data", "fsdp", "tensor")), ("table_dim", None),
                     ("features", None))

    def __init__(self, config):
        super().__init__(config)
        self.spec = self.data_config

    @functools.cached_property
    def log(self) -> clicks.ClickLog:
        return clicks.generate(self.spec)

    @functools.cached_property
    def bayes_metrics(self) -> dict[str, float]:
        """AUC and log-loss of the true click probabilities on the held-out set."""
        e = self.log.eval
        return {"bayes_auc": roc_auc(e["label"], e["prob"]),
                "bayes_logloss": log_loss(e["label"], e["prob"])}

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return models.build_model(self.config.model, rngs=rngs, vocab_sizes=self.spec.vocab_sizes,
                                  num_dense=clicks.NUM_DENSE)

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # the model is deterministic
        logits = model(batch["dense"], batch["ids"])
        losses = optax.sigmoid_binary_cross_entropy(logits, batch["label"])
        mask = batch["mask"]
        count = jnp.maximum(jnp.sum(mask), 1.0)
        loss = jnp.sum(losses * mask) / count
        return loss, {"mean_prob": jnp.sum(jax.nn.sigmoid(logits) * mask) / count}

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        prob = jax.nn.sigmoid(model(batch["dense"], batch["ids"]))
        return {"prob": prob, "label": batch["label"], "mask": batch["mask"]}

    def summarize_eval(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        keep = np.concatenate([o["mask"] for o in outputs]) > 0.5
        prob = np.concatenate([o["prob"] for o in outputs])[keep]
        label = np.concatenate([o["label"] for o in outputs])[keep]
        auc = roc_auc(label, prob)
        bayes = self.bayes_metrics
        return {"auc": auc, "logloss": log_loss(label, prob), "mean_prob": float(np.mean(prob)),
                **bayes, "auc_gap": bayes["bayes_auc"] - auc}

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        return shuffled_batches(
            _inputs(self.log.train), global_batch_size=self.config.train.batch_size,
            seed=self.config.train.seed, process_index=process_index,
            process_count=process_count, start_step=start_step, mask=True,
        )

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        return held_out_batches(
            _inputs(self.log.eval), global_batch_size=self.config.train.batch_size,
            process_index=process_index, process_count=process_count,
        )

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        return {"dense": ("batch", "features"), "ids": ("batch", "features"),
                "label": ("batch",), "mask": ("batch",)}

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global batch (for `python -m infra plan`)."""
        f32 = jnp.float32
        return {"dense": jax.ShapeDtypeStruct((batch_size, clicks.NUM_DENSE), f32),
                "ids": jax.ShapeDtypeStruct((batch_size, clicks.NUM_CATEGORICAL), jnp.int32),
                "label": jax.ShapeDtypeStruct((batch_size,), f32),
                "mask": jax.ShapeDtypeStruct((batch_size,), f32)}
