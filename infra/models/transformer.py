"""Decoder-only transformer LM in Flax NNX: RMSNorm, GQA attention with RoPE, SwiGLU MLP.

Every weight is an ``nnx.Param`` whose ``out_sharding`` metadata holds logical axis names
(``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``norm``); the config's
``sharding.rules`` map them to mesh axes. The module holds no state other than Params (no RNGs,
no dropout), so ``nnx.state(model, nnx.Param)`` is the whole state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from infra.errors import ConfigError
from infra.models import register

_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str, key: str) -> jnp.dtype:
    if str(name) not in _DTYPES:
        raise ConfigError(f"model.{key} is {name!r}; expected one of {', '.join(_DTYPES)}")
    return jnp.dtype(str(name))


def _normal(stddev: float) -> jax.nn.initializers.Initializer:
    return jax.nn.initializers.normal(stddev=stddev)


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> nnx.Param:
    """A Param initialised with ``init`` and annotated with logical axis names."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last dim of x: (batch, length, heads, head_dim)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (length, half)
    sin = jnp.sin(angles)[None, :, None, :]
    cos = jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale; computed in float32, returns ``dtype``."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = _param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE on q and k."""

    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, out_scale: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.dtype = dtype
        in_init = _normal(1.0 / math.sqrt(d_model))
        out_init = _normal(out_scale / math.sqrt(num_heads * head_dim))
        self.q = _param(rngs, in_init, (d_model, num_heads, head_dim), param_dtype,
                        ("embed", "heads", "head_dim"))
        self.k = _param(rngs, in_init, (d_model, num_kv_heads, head_dim), param_dtype,
                        ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, in_init, (d_model, num_kv_heads, head_dim), param_dtype,
                        ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, out_init, (num_heads, head_dim, d_model), param_dtype,
                        ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        dt = self.dtype
        b, t, _ = x.shape
        x = x.astype(dt)
        q = jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt))
        k = jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt))
        v = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        # Query head n uses kv head n // group: split heads into (kv_heads, group).
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(self.head_dim)
        causal = positions[:, None] >= positions[None, :]  # (t, s)
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        out = out.reshape(b, t, self.num_heads, self.head_dim)
        return jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dt))


class MLP(nnx.Module):
    """SwiGLU feed-forward: (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, *, d_model: int, mlp_dim: int, out_scale: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        in_init = _normal(1.0 / math.sqrt(d_model))
        self.gate = _param(rngs, in_init, (d_model, mlp_dim), param_dtype, ("embed", "mlp"))
        self.up = _param(rngs, in_init, (d_model, mlp_dim), param_dtype, ("embed", "mlp"))
        self.down = _param(rngs, _normal(out_scale / math.sqrt(mlp_dim)), (mlp_dim, d_model),
                           param_dtype, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 mlp_dim: int, rope_theta: float, norm_eps: float, out_scale: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(d_model, eps=norm_eps, **common)
        self.attn = Attention(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, rope_theta=rope_theta, out_scale=out_scale,
                              **common)
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps, **common)
        self.mlp = MLP(d_model=d_model, mlp_dim=mlp_dim, out_scale=out_scale, **common)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


@register("transformer")
class Transformer(nnx.Module):
    """Decoder-only language model: tokens (batch, length) int32 -> logits (batch, length, vocab) float32."""

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, mlp_dim: int, max_seq_len: int,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, tie_embeddings: bool = True,
                 dtype: str = "float32", param_dtype: str = "float32", rngs: nnx.Rngs):
        sizes = dict(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     mlp_dim=mlp_dim, max_seq_len=max_seq_len)
        for key, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if num_heads % num_kv_heads:
            raise ConfigError(f"model.num_heads ({num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ConfigError(f"model.head_dim ({head_dim}) must be even for rotary embeddings")
        compute_dtype = _dtype(dtype, "dtype")
        storage_dtype = _dtype(param_dtype, "param_dtype")

        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.tie_embeddings = bool(tie_embeddings)
        self.dtype = compute_dtype
        out_scale = 1.0 / math.sqrt(2 * num_layers)  # GPT-2 residual-projection scaling

        self.embedding = _param(rngs, _normal(0.02), (vocab_size, d_model), storage_dtype,
                                ("vocab", "embed"))
        self.blocks = nnx.List([
            Block(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  head_dim=head_dim, mlp_dim=mlp_dim, rope_theta=float(rope_theta),
                  norm_eps=float(norm_eps), out_scale=out_scale, dtype=compute_dtype,
                  param_dtype=storage_dtype, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.final_norm = RMSNorm(d_model, eps=float(norm_eps), dtype=compute_dtype,
                                  param_dtype=storage_dtype, rngs=rngs)
        if not self.tie_embeddings:
            self.unembedding = _param(rngs, _normal(1.0 / math.sqrt(d_model)),
                                      (d_model, vocab_size), storage_dtype, ("embed", "vocab"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[1]
        if length > self.max_seq_len:
            raise ConfigError(f"sequence length {length} exceeds model.max_seq_len "
                              f"{self.max_seq_len}; raise model.max_seq_len or lower data.seq_len")
        dt = self.dtype
        positions = jnp.arange(length)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dt)
        for block in self.blocks:
            x = block(x, positions)
        x = self.final_norm(x)
        if self.tie_embeddings:
            return jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(dt),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", x, self.unembedding[...].astype(dt),
                          preferred_element_type=jnp.float32)
