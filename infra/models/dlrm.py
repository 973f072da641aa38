"""DLRM (Naumov et al., 2019) in Flax NNX: embeddings, bottom MLP, pairwise dots, top MLP.

    dense (B, num_dense) ─ bottom MLP ─► x (B, d)
    ids   (B, F)         ─ one table  ─► e (B, F, d)
    z = [x, e_1 .. e_F]  (B, F+1, d);  dots = z_i · z_j for i < j   ((F+1) F / 2 per example)
    logit = top MLP([x, dots])                                       (B,)

Embeddings: ONE concatenated table for all F features. Feature `f`'s ids live in rows
`offsets[f] .. offsets[f] + vocab_sizes[f] - 1`, and the total is padded up to a multiple of
`row_multiple` (the padding rows are never looked up). One table, rather than one per feature,
shards evenly however small each vocabulary is (a 3-id feature could not be split 8 ways) and
needs one lookup. Its logical axes are ("table_rows", "table_dim"); the default rules split rows
over every mesh axis (data, fsdp, tensor), so the padded row count must be divisible by their
product: the default 64 serves any power-of-two mesh up to 64 devices (raise it for bigger
ones, or `infra.sharding.fit_spec` leaves the table replicated and the run warns when it is big).
A lookup is a plain `jnp.take` on the sharded table; XLA's SPMD partitioner turns it into the
row-wise pattern on any mesh (checked in the compiled HLO on data=8, fsdp=8, tensor=8 and
data=2,fsdp=2,tensor=2): the ids are all-gathered, each device gathers the rows it holds (zeros
for the others) and the (batch, F, d) result is all-reduced; the backward pass all-gathers those
cotangents and scatter-adds them into the local rows. The table itself never moves.

MLP weights alternate ("features", "mlp") and ("mlp", "features") (Megatron-style pairs, so a
tensor axis splits the hidden units); `vocab_sizes` and `num_dense` come from the data (the
click-through task passes them), the rest are `model.*` config keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.errors import ConfigError, check_positive_ints
from infra.models.hparams import HyperParams
from infra.models.transformer import param
from infra.sharding import constrain


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _check_sizes(key: str, sizes) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not all(_positive(s) for s in sizes):
        raise ConfigError(f"model.{key} must be a list of positive integers, got {sizes}",
                          key=f"model.{key}", value="[64]", verb="e.g.")
    return sizes


class MLP(nnx.Module):
    """Dense layers with ReLU between them (none after the last)."""

    def __init__(self, sizes: tuple[int, ...], *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernels = nnx.List()
        self.biases = nnx.List()
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            axes = ("features", "mlp") if i % 2 == 0 else ("mlp", "features")
            init = jax.nn.initializers.normal(stddev=np.sqrt(2.0 / n_in))  # He
            self.kernels.append(param(rngs, init, (n_in, n_out), param_dtype, axes))
            self.biases.append(param(rngs, jax.nn.initializers.zeros, (n_out,), param_dtype,
                                      axes[1:]))

    def __call__(self, x: jax.Array) -> jax.Array:
        last = len(self.kernels) - 1
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            x = x.astype(self.dtype) @ w[...].astype(self.dtype) + b[...].astype(self.dtype)
            if i < last:
                x = jax.nn.relu(x)
        return x


@dataclasses.dataclass(frozen=True)
class DLRMConfig(HyperParams):
    """DLRM's `model.*` keys; the vocabulary sizes and dense feature count come from the data."""

    embed_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (128, 64)
    row_multiple: int = 64  # table rows padded to a multiple of this: divisible by the devices
    embed_init_std: float = 0.05
    dtype: str = "float32"
    param_dtype: str = "float32"

    from_data = ("vocab_sizes", "num_dense")

    def validate(self) -> None:
        _check_sizes("bottom_mlp", self.bottom_mlp)
        _check_sizes("top_mlp", self.top_mlp)
        check_positive_ints("model", embed_dim=self.embed_dim, row_multiple=self.row_multiple)
        if not self.embed_init_std > 0:
            raise ConfigError(f"model.embed_init_std must be > 0, got {self.embed_init_std}",
                              key="model.embed_init_std", value=0.05, verb="e.g.")


class DLRM(nnx.Module):
    """Click logit from dense features (B, num_dense) and per-feature ids (B, F)."""

    Config = DLRMConfig

    def __init__(self, config: DLRMConfig, *, vocab_sizes, num_dense: int, rngs: nnx.Rngs):
        c = config
        vocab_sizes = _check_sizes("vocab_sizes", vocab_sizes)
        check_positive_ints("model", num_dense=num_dense)
        self.dtype = jnp.dtype(c.dtype)
        pdtype = jnp.dtype(c.param_dtype)
        self.vocab_sizes = vocab_sizes
        self.offsets = tuple(int(o) for o in np.cumsum((0,) + vocab_sizes[:-1]))
        rows = -(-sum(vocab_sizes) // c.row_multiple) * c.row_multiple
        self.table = param(rngs, jax.nn.initializers.normal(stddev=c.embed_init_std),
                            (rows, c.embed_dim), pdtype, ("table_rows", "table_dim"))
        self.bottom = MLP((num_dense, *c.bottom_mlp, c.embed_dim), dtype=self.dtype,
                          param_dtype=pdtype, rngs=rngs)
        num_vectors = len(vocab_sizes) + 1
        num_dots = num_vectors * (num_vectors - 1) // 2
        self.top = MLP((c.embed_dim + num_dots, *c.top_mlp, 1), dtype=self.dtype,
                       param_dtype=pdtype, rngs=rngs)

    def embed(self, ids: jax.Array) -> jax.Array:
        """(B, F) per-feature ids -> (B, F, embed_dim) rows of the concatenated table."""
        rows = ids.astype(jnp.int32) + jnp.asarray(self.offsets, jnp.int32)
        return jnp.take(self.table[...], rows, axis=0).astype(self.dtype)

    def __call__(self, dense: jax.Array, ids: jax.Array) -> jax.Array:
        x = constrain(self.bottom(dense), ("batch", "act_embed"))
        e = constrain(self.embed(ids), ("batch", "features", "act_embed"))
        z = jnp.concatenate([x[:, None, :], e], axis=1)  # (B, F+1, d)
        gram = jnp.einsum("bid,bjd->bij", z, z)
        i, j = np.triu_indices(z.shape[1], k=1)
        dots = gram[:, i, j]  # (B, (F+1) F / 2)
        logit = self.top(jnp.concatenate([x, dots], axis=-1))
        return logit[:, 0].astype(jnp.float32)
