"""Image classifiers in Flax NNX: a Vision Transformer ("vit") and a small ResNet ("convnet").

Both map images (batch, height, width, channels) float -> logits (batch, num_classes) float32 and
annotate every weight with logical axis names, so the config's sharding rules lay them out:

* ViT: patch embedding ("patch", "embed") — "patch" is one flattened patch_size^2 * channels
  patch; learned positions ("length", "embed"); encoder blocks are the LM's
  `infra.models.transformer.Block` with `causal=False` (its rotary embedding over the row-major
  patch index adds a relative-position signal on top of the learned positions); optional CLS
  token ("embed",); head ("embed", "classes"). Activations are pinned like the LM's
  ("batch", "length", "act_embed"), so sequence parallelism splits the patches.
* ConvNet: conv kernels ("kernel", "kernel", "conv_in", "conv_out"), biases ("conv_out",),
  pre-activation residual blocks with RMSNorm over channels ("norm",), global mean pool, head
  ("conv_in", "classes"). No batch norm: the model holds parameters only (what the loop supports).
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

_zeros = jax.nn.initializers.zeros


def _check_images(images: jax.Array, size: int, channels: int) -> None:
    if images.ndim != 4 or images.shape[1:] != (size, size, channels):
        raise ConfigError(f"images of shape {tuple(images.shape[1:])} do not match the model's "
                          f"(image_size, image_size, channels) = ({size}, {size}, {channels}); set "
                          "model.image_size and model.channels to the images' size")


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C): non-overlapping patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


@dataclasses.dataclass(frozen=True)
class ViTConfig(HyperParams):
    """The ViT's `model.*` keys (`head_dim` 0 = d_model / num_heads)."""

    image_size: int
    channels: int
    num_classes: int
    patch_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    head_dim: int = 0
    pool: str = "mean"  # mean over patches | cls token
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    choices = {**HyperParams.choices, "pool": ("mean", "cls")}

    def validate(self) -> None:
        check_positive_ints("model", image_size=self.image_size, channels=self.channels,
                            num_classes=self.num_classes, patch_size=self.patch_size,
                            d_model=self.d_model, num_layers=self.num_layers,
                            num_heads=self.num_heads, mlp_dim=self.mlp_dim)
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size ({self.image_size}) must be a multiple of "
                              f"model.patch_size ({self.patch_size})")
        if self.resolved_head_dim <= 0 or self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.resolved_head_dim}) must be even and "
                              "positive (rotary embeddings)", key="model.head_dim",
                              value="<even number>")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


class ViT(nnx.Module):
    """Vision Transformer: patches -> linear embedding + learned positions -> non-causal pre-norm
    encoder blocks -> final norm -> mean over patches (or the CLS token) -> linear head."""

    Config = ViTConfig

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        c = config
        compute, storage = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.image_size, self.channels, self.patch_size = c.image_size, c.channels, c.patch_size
        self.pool, self.dtype = c.pool, compute
        d_model, patch_size = c.d_model, c.patch_size
        patch_dim = patch_size * patch_size * c.channels
        tokens = (c.image_size // patch_size) ** 2 + (c.pool == "cls")

        self.patch_embed = param(rngs, normal(1.0 / math.sqrt(patch_dim)), (patch_dim, d_model),
                                  storage, ("patch", "embed"))
        self.patch_bias = param(rngs, _zeros, (d_model,), storage, ("embed",))
        self.positions = param(rngs, normal(0.02), (tokens, d_model), storage, ("length", "embed"))
        if c.pool == "cls":
            self.cls = param(rngs, _zeros, (d_model,), storage, ("embed",))
        self.blocks = nnx.List([
            Block(d_model=d_model, num_heads=c.num_heads, num_kv_heads=c.num_heads,
                  head_dim=c.resolved_head_dim, mlp_dim=c.mlp_dim, rope_theta=c.rope_theta,
                  norm_eps=c.norm_eps, out_scale=1.0 / math.sqrt(2 * c.num_layers), dtype=compute,
                  param_dtype=storage, causal=False, rngs=rngs)
            for _ in range(c.num_layers)
        ])
        self.final_norm = RMSNorm(d_model, eps=c.norm_eps, dtype=compute, param_dtype=storage,
                                  rngs=rngs)
        self.head = param(rngs, normal(0.02), (d_model, c.num_classes), storage, ("embed", "classes"))
        self.head_bias = param(rngs, _zeros, (c.num_classes,), storage, ("classes",))

    def __call__(self, images: jax.Array) -> jax.Array:
        _check_images(images, self.image_size, self.channels)
        dt = self.dtype
        x = patchify(images.astype(dt), self.patch_size)
        x = jnp.einsum("bnp,pd->bnd", x, self.patch_embed[...].astype(dt)) + self.patch_bias[...].astype(dt)
        if self.pool == "cls":
            cls = jnp.broadcast_to(self.cls[...].astype(dt), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = constrain(x + self.positions[...].astype(dt), RESIDUAL_AXES)
        positions = jnp.arange(x.shape[1])
        for block in self.blocks:
            x = block(x, positions)
        x = self.final_norm(x)
        pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x.astype(jnp.float32), axis=1).astype(dt)
        logits = jnp.einsum("bd,dk->bk", pooled, self.head[...].astype(dt),
                            preferred_element_type=jnp.float32) + self.head_bias[...]
        return constrain(logits, ("batch", "classes"))


class Conv(nnx.Module):
    """k x k convolution, 'SAME' padding, NHWC; kernel ("kernel", "kernel", "conv_in", "conv_out")."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int, stride: int, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.stride, self.dtype = stride, dtype
        fan_in = kernel * kernel * c_in
        self.kernel = param(rngs, normal(math.sqrt(2.0 / fan_in)), (kernel, kernel, c_in, c_out),
                             param_dtype, ("kernel", "kernel", "conv_in", "conv_out"))
        self.bias = param(rngs, _zeros, (c_out,), param_dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dt), self.kernel[...].astype(dt), window_strides=(self.stride, self.stride),
            padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return constrain(y + self.bias[...].astype(dt), ("batch", None, None, None))


class ResBlock(nnx.Module):
    """Pre-activation residual block: x' = skip(x) + conv(relu(norm(conv_s(relu(norm(x)))))),
    where conv_s has stride `stride` and skip is a strided 1x1 conv when the shape changes."""

    def __init__(self, c_in: int, c_out: int, *, stride: int, norm_eps: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(c_in, eps=norm_eps, **common)
        self.conv1 = Conv(c_in, c_out, kernel=3, stride=stride, **common)
        self.norm2 = RMSNorm(c_out, eps=norm_eps, **common)
        self.conv2 = Conv(c_out, c_out, kernel=3, stride=1, **common)
        self.skip = (Conv(c_in, c_out, kernel=1, stride=stride, **common)
                     if stride != 1 or c_in != c_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.relu(self.norm1(x)))
        h = self.conv2(jax.nn.relu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


@dataclasses.dataclass(frozen=True)
class ConvNetConfig(HyperParams):
    """The small ResNet's `model.*` keys."""

    image_size: int
    channels: int
    num_classes: int
    widths: tuple[int, ...] = (32, 64)
    blocks_per_stage: int = 1
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self) -> None:
        check_positive_ints("model", image_size=self.image_size, channels=self.channels,
                            num_classes=self.num_classes, blocks_per_stage=self.blocks_per_stage)
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ConfigError(f"model.widths must be a non-empty tuple of positive integers, got "
                              f"{self.widths!r}", key="model.widths", value="'(32, 64)'",
                              verb="e.g.")


class ConvNet(nnx.Module):
    """Small ResNet: 3x3 stem conv, then per stage `blocks_per_stage` residual blocks of
    `widths[i]` channels (every stage after the first starts with stride 2), norm, ReLU, global
    mean pool, linear head."""

    Config = ConvNetConfig

    def __init__(self, config: ConvNetConfig, *, rngs: nnx.Rngs):
        c = config
        compute, storage = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        common = dict(dtype=compute, param_dtype=storage, rngs=rngs)
        self.image_size, self.channels, self.dtype = c.image_size, c.channels, compute
        self.stem = Conv(c.channels, c.widths[0], kernel=3, stride=1, **common)
        blocks, c_in = [], c.widths[0]
        for stage, width in enumerate(c.widths):
            for i in range(c.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResBlock(c_in, width, stride=stride, norm_eps=c.norm_eps, **common))
                c_in = width
        self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(c_in, eps=c.norm_eps, **common)
        self.head = param(rngs, normal(0.02), (c_in, c.num_classes), storage, ("conv_in", "classes"))
        self.head_bias = param(rngs, _zeros, (c.num_classes,), storage, ("classes",))

    def __call__(self, images: jax.Array) -> jax.Array:
        _check_images(images, self.image_size, self.channels)
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu(self.final_norm(x))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        logits = jnp.einsum("bc,ck->bk", pooled, self.head[...].astype(self.dtype),
                            preferred_element_type=jnp.float32) + self.head_bias[...]
        return constrain(logits, ("batch", "classes"))
