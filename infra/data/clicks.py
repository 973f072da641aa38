"""A synthetic click log drawn from a hidden ground-truth click model, so the best AUC is known.

Shape (Criteo-like, scaled down): every example has 13 dense count features, 26 categorical
features and a 0/1 click label. Feature `f` takes ids `0 .. vocab_sizes[f] - 1`, its cardinality
in the Criteo Kaggle set capped at `max_vocab`; ids are drawn from a Zipf law (`P(rank r) ∝
(r + 1) ** -zipf`) and each feature maps ranks to ids through its own random permutation, so
popular ids are scattered over the id range (and over the shards of a row-sharded table).

The ground truth, drawn from `default_rng([seed, 0])` and fixed by the seed, vocabularies, `zipf`,
`hidden_dim` and `target_ctr` alone, is a logistic model that a DLRM can represent exactly::

    t_j   = (log1p(count_j) - m_j) / s_j                       13 transformed dense features
    logit = bias + w · t + c · t_0²                             dense: linear + one quadratic
          + Σ_f  b_f[id_f]                                      a scalar effect per id
          + Σ_{(f,g) in PAIRS}  u_f[id_f] · u_g[id_g]           dot products of hidden id vectors
          + (t @ A) · u_{f*}[id_{f*}]                           one dense × id interaction
    P(click) = sigmoid(logit)

with `b_f[id] ~ N(0, σ_f²)`, `σ_f = r_f ×` one of 0.1, 0.2, 0.35, 0.5 (drawn per feature),
`u_f[id] ~ N(0, (0.8 r_f)² I / hidden_dim)` and `r_f = min(1, 300 / vocab_f)`. So
high-cardinality features carry a weak per-id signal (as hashed user or item ids do in real
logs): the signal sits in ids seen often enough to be learnt, and the many rare ids of the big
vocabularies are mostly noise a model must not memorise. The 8 interacting pairs join low- and
mid-cardinality features. `bias` is set (bisection on a calibration sample) so the mean click
probability is `target_ctr`. Dense counts are `floor(exp(μ_j + σ_j g_j))`, `g` standard normal
with a shared factor (many zeros, heavy tails).

With the defaults the base CTR is 25% and the ground truth's own AUC on the held-out set is
0.793 (log-loss 0.450); seeds 1 and 2 give 0.823 and 0.811.

Examples: training set from `default_rng([seed, 1])`, held-out set from `default_rng([seed, 2])`
(fixed whatever `num_train` is), each example's label a Bernoulli draw of its true probability.
Each split keeps that probability (`prob`), so the Bayes-optimal AUC and log-loss on the
held-out set are known; it is never an input of the model. Everything is vectorised numpy:
the default 2M + 200k examples take a few seconds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from infra.errors import ConfigError, check_positive_ints
from infra.section import Section

NUM_DENSE = 13
# Cardinalities of the 26 categorical features of the Criteo Kaggle display-advertising set.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
NUM_CATEGORICAL = len(CRITEO_CARDINALITIES)
# Feature pairs whose hidden id vectors interact, and the dense × id interaction's feature.
PAIRS = ((0, 1), (1, 7), (4, 24), (5, 13), (8, 16), (19, 21), (22, 24), (13, 22))
DENSE_ID_FEATURE = 4


@dataclasses.dataclass(frozen=True)
class ClickSpec(Section):
    """Everything the click log is a function of: the ctr task's `data` section."""

    prefix: ClassVar[str] = "data"

    seed: int = 0
    num_train: int = 2_000_000
    num_eval: int = 200_000
    max_vocab: int = 5000
    zipf: float = 1.2
    hidden_dim: int = 4
    target_ctr: float = 0.25

    @classmethod
    def unknown_key(cls, key: str) -> ConfigError:
        return ConfigError(f"unknown key data.{key} for the ctr task; known: "
                           f"{', '.join('data.' + k for k in cls.accepted())}")

    def validate(self) -> None:
        check_positive_ints("data", **{key: getattr(self, key)
                                       for key in ("num_train", "num_eval", "max_vocab", "hidden_dim")})
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"data.seed must be a non-negative integer, got {self.seed}",
                              key="data.seed", value=0)
        if not self.zipf > 0:
            raise ConfigError(f"data.zipf must be > 0, got {self.zipf}", key="data.zipf", value=1.1)
        if not 0 < self.target_ctr < 1:
            raise ConfigError(f"data.target_ctr must be in (0, 1), got {self.target_ctr}",
                              key="data.target_ctr", value=0.25)

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Ids per categorical feature: the Criteo cardinalities capped at `max_vocab`."""
        return tuple(min(c, self.max_vocab) for c in CRITEO_CARDINALITIES)


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """The hidden logistic click model (see the module docstring for its form)."""

    dense_mu: np.ndarray  # (13,) count model: floor(exp(mu + sigma * g))
    dense_sigma: np.ndarray  # (13,)
    dense_w: np.ndarray  # (13,)
    quad: float  # coefficient of t_0 ** 2
    id_effects: tuple[np.ndarray, ...]  # per feature: (vocab,)
    hidden: tuple[np.ndarray, ...]  # per feature: (vocab, hidden_dim); zeros if in no pair
    dense_id: np.ndarray  # (13, hidden_dim)
    rank_to_id: tuple[np.ndarray, ...]  # per feature: a permutation of its ids
    cdfs: tuple[np.ndarray, ...]  # per feature: Zipf CDF over ranks
    bias: float

    def transform(self, counts: np.ndarray) -> np.ndarray:
        """Standardised log counts `t`, (n, 13) float64."""
        return (np.log1p(counts) - self.dense_mu) / self.dense_sigma

    def logits(self, counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The true click logit of each example (float64)."""
        t = self.transform(counts)
        out = self.bias + t @ self.dense_w + self.quad * t[:, 0] ** 2
        for f, table in enumerate(self.id_effects):
            out += table[ids[:, f]]
        for f, g in PAIRS:
            out += np.einsum("nk,nk->n", self.hidden[f][ids[:, f]], self.hidden[g][ids[:, g]])
        f = DENSE_ID_FEATURE
        out += np.einsum("nk,nk->n", t @ self.dense_id, self.hidden[f][ids[:, f]])
        return out

    def probs(self, counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(counts, ids)))

    def features(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` examples' (dense counts (n, 13) float32, ids (n, 26) int32)."""
        f32 = np.float32
        shared = rng.standard_normal((n, 1), dtype=f32)
        g = f32(0.5) * shared + f32(np.sqrt(0.75)) * rng.standard_normal((n, NUM_DENSE), dtype=f32)
        counts = np.floor(np.exp(self.dense_mu.astype(f32) + self.dense_sigma.astype(f32) * g))
        cols = np.empty((len(self.cdfs), n), np.int32)
        for f, cdf in enumerate(self.cdfs):
            ranks = np.searchsorted(cdf, rng.random(n, dtype=np.float32), side="right")
            cols[f] = self.rank_to_id[f][np.minimum(ranks, len(cdf) - 1)]
        ids = np.ascontiguousarray(cols.T)
        return counts, ids


def _zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return (cdf / cdf[-1]).astype(np.float32)  # compared with float32 uniforms


def _calibrate_bias(logits: np.ndarray, target: float) -> float:
    """The b with mean(sigmoid(logits + b)) = target (bisection; the mean is monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_ground_truth(spec: ClickSpec) -> GroundTruth:
    """The hidden model: a function of seed, vocabularies, zipf, hidden_dim and target_ctr only."""
    rng = np.random.default_rng([spec.seed, 0])
    vocabs, k = spec.vocab_sizes, spec.hidden_dim
    dense_mu = rng.uniform(-0.5, 3.0, NUM_DENSE)
    dense_sigma = rng.uniform(0.8, 1.5, NUM_DENSE)
    dense_w = rng.normal(0.0, 0.25, NUM_DENSE)
    # Per-id effect sizes: weaker for bigger vocabularies (see the module docstring).
    strength = np.minimum(1.0, 300.0 / np.asarray(vocabs))
    scales = strength * rng.choice([0.1, 0.2, 0.35, 0.5], size=NUM_CATEGORICAL)
    id_effects = tuple(rng.normal(0.0, s, v) for s, v in zip(scales, vocabs))
    paired = {f for pair in PAIRS for f in pair} | {DENSE_ID_FEATURE}
    hidden = tuple(
        rng.normal(0.0, 0.8 * strength[f] / np.sqrt(k), (v, k)) if f in paired else np.zeros((v, k))
        for f, v in enumerate(vocabs)
    )
    dense_id = rng.normal(0.0, 0.3, (NUM_DENSE, k))
    rank_to_id = tuple(rng.permutation(v).astype(np.int32) for v in vocabs)
    cdfs = tuple(_zipf_cdf(v, spec.zipf) for v in vocabs)
    truth = GroundTruth(dense_mu, dense_sigma, dense_w, -0.15, id_effects, hidden, dense_id,
                        rank_to_id, cdfs, bias=0.0)
    counts, ids = truth.features(100_000, np.random.default_rng([spec.seed, 3]))
    bias = _calibrate_bias(truth.logits(counts, ids), spec.target_ctr)
    return dataclasses.replace(truth, bias=bias)


def _split(truth: GroundTruth, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    counts, ids = truth.features(n, rng)
    prob = truth.probs(counts, ids)
    label = (rng.random(n) < prob).astype(np.float32)
    return {"dense": counts, "ids": ids, "label": label, "prob": prob}


@dataclasses.dataclass(frozen=True)
class ClickLog:
    """The generated data: `train` and `eval` dicts of `dense`, `ids`, `label`, `prob` arrays."""

    spec: ClickSpec
    truth: GroundTruth
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]


@functools.lru_cache(maxsize=2)
def generate(spec: ClickSpec) -> ClickLog:
    """The click log of `spec`, deterministic from `spec.seed` (cached: specs are hashable)."""
    truth = make_ground_truth(spec)
    return ClickLog(
        spec=spec,
        truth=truth,
        train=_split(truth, spec.num_train, np.random.default_rng([spec.seed, 1])),
        eval=_split(truth, spec.num_eval, np.random.default_rng([spec.seed, 2])),
    )
