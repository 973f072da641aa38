"""Patch-transformer forecaster: a window of a (multivariate) series -> the next `horizon` steps.

1. Per-window normalisation (RevIN-style, no learned parameters): each input column is centred
   on its last value (`center="last"`) or its mean (`"mean"`) over the window and divided by its
   standard deviation over the window; the forecast is mapped back with the target columns'
   statistics, so a trend or level shift never has to be learned.
2. Patch embedding: the window is cut into `window / patch_len` non-overlapping patches, each
   (patch_len, features) patch projected to `d_model` (weight logical axes ("window", "features",
   "embed")).
3. Encoder: `num_layers` of `infra.models.transformer.Block` with `causal=False` (every patch sees
   every other; all patches lie at or before the forecast origin) and rotary positions.
4. Head: the flattened patch tokens -> (horizon, targets) (weight ("window", "embed", "horizon",
   "features")), plus a per-target linear map of the normalised window (`linear_skip`, NLinear
   style; off by default).

Input (batch, window, features) and output (batch, horizon, targets) are in the series' units.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from infra.errors import ConfigError, check_positive_ints
from infra.models.hparams import HyperParams
from infra.models.transformer import RESIDUAL_AXES, Block, RMSNorm, normal, param
from infra.sharding import constrain

CENTERS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class ForecasterConfig(HyperParams):
    """The forecaster's `model.*` keys; window, horizon and the columns come from the data."""

    patch_len: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    center: str = "last"  # normalise each window around its last value or its mean
    linear_skip: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    from_data = ("window", "horizon", "features", "target_channels")
    choices = {**HyperParams.choices, "center": CENTERS}

    def validate(self) -> None:
        check_positive_ints("model", patch_len=self.patch_len, d_model=self.d_model,
                            num_layers=self.num_layers, num_heads=self.num_heads,
                            head_dim=self.head_dim, mlp_dim=self.mlp_dim)
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")


class Forecaster(nnx.Module):
    """(batch, window, features) float -> (batch, horizon, len(target_channels)) float32."""

    Config = ForecasterConfig

    def __init__(self, config: ForecasterConfig, *, window: int, horizon: int, features: int,
                 target_channels: tuple[int, ...], rngs: nnx.Rngs):
        c = config
        check_positive_ints("model", window=window, horizon=horizon, features=features)
        if window % c.patch_len:
            raise ConfigError(f"data.window={window} is not a multiple of model.patch_len="
                              f"{c.patch_len}; pick a patch_len that divides the window")
        target_channels = tuple(int(t) for t in target_channels)
        if not target_channels or not all(0 <= t < features for t in target_channels):
            raise ConfigError(f"target channels {target_channels} must index the {features} "
                              "input columns")
        compute, storage = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        patch_len, d_model = c.patch_len, c.d_model
        self.window, self.horizon, self.patch_len = window, horizon, patch_len
        self.num_patches = window // patch_len
        self.target_channels = target_channels
        self.center = c.center
        self.eps = c.eps
        self.dtype = compute
        k = len(target_channels)
        fan_in = patch_len * features
        self.patch_embed = param(rngs, normal(1.0 / math.sqrt(fan_in)),
                                  (patch_len, features, d_model), storage,
                                  ("window", "features", "embed"))
        self.patch_bias = param(rngs, jax.nn.initializers.zeros, (d_model,), storage, ("embed",))
        out_scale = 1.0 / math.sqrt(2 * c.num_layers)
        self.blocks = nnx.List([
            Block(d_model=d_model, num_heads=c.num_heads, num_kv_heads=c.num_heads,
                  head_dim=c.head_dim, mlp_dim=c.mlp_dim, rope_theta=c.rope_theta,
                  norm_eps=c.norm_eps, out_scale=out_scale, dtype=compute,
                  param_dtype=storage, rngs=rngs, causal=False)
            for _ in range(c.num_layers)
        ])
        self.final_norm = RMSNorm(d_model, eps=c.norm_eps, dtype=compute,
                                  param_dtype=storage, rngs=rngs)
        head_fan_in = self.num_patches * d_model
        self.head = param(rngs, normal(0.1 / math.sqrt(head_fan_in)),
                           (self.num_patches, d_model, horizon, k), storage,
                           ("window", "embed", "horizon", "features"))
        self.head_bias = param(rngs, jax.nn.initializers.zeros, (horizon, k), storage,
                                ("horizon", "features"))
        self.linear_skip = c.linear_skip
        if self.linear_skip:
            self.linear = param(rngs, jax.nn.initializers.zeros, (window, horizon, k), storage,
                                 ("window", "horizon", "features"))

    def window_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(center, scale), each (batch, 1, features), of every input column over the window."""
        x = x.astype(jnp.float32)
        loc = x[:, -1:, :] if self.center == "last" else jnp.mean(x, axis=1, keepdims=True)
        scale = jnp.std(x, axis=1, keepdims=True) + self.eps
        return loc, scale

    def target_scale(self, x: jax.Array) -> jax.Array:
        """(batch, 1, targets): the scale that maps errors of the forecast into normalised units."""
        return self.window_stats(x)[1][..., list(self.target_channels)]

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        if t != self.window:
            raise ConfigError(f"input window has {t} steps, the model expects {self.window}")
        loc, scale = self.window_stats(x)
        z = (x.astype(jnp.float32) - loc) / scale  # (b, window, features)
        dt = self.dtype
        patches = z.reshape(b, self.num_patches, self.patch_len, c).astype(dt)
        h = jnp.einsum("bnpc,pcd->bnd", patches, self.patch_embed[...].astype(dt))
        h = constrain(h + self.patch_bias[...].astype(dt), RESIDUAL_AXES)
        positions = jnp.arange(self.num_patches)
        for block in self.blocks:
            h = block(h, positions)
        h = self.final_norm(h)
        out = jnp.einsum("bnd,ndhk->bhk", h, self.head[...].astype(dt),
                         preferred_element_type=jnp.float32)
        out = out + self.head_bias[...].astype(jnp.float32)
        tc = list(self.target_channels)
        if self.linear_skip:
            out = out + jnp.einsum("btk,thk->bhk", z[..., tc], self.linear[...].astype(jnp.float32))
        return out * scale[..., tc] + loc[..., tc]  # (b, horizon, targets), original units
