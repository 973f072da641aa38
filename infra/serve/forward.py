"""The transformer's forward pass against a KV cache: prefill one prompt, decode every slot.

The math is the training forward's (`infra.models.transformer`): the same modules compute the
embedding lookup, RMSNorms, q/k/v projections with their biases and q/k norms, RoPE (llama3
scaling included), the MLP, the final norm and the tied or untied output projection; only
the attention reads its keys and values from the cache. `attend` mirrors
`Attention.__call__`'s head-major layout, scaling, float32 scores, additive mask and the cast
of the probabilities, so cached logits equal a full forward pass to float32 rounding
(tests/test_serve_engine.py checks 1e-5).

The cache is two arrays ``[layers, slots, max_len, kv_heads, head_dim]`` (keys, values),
contiguous per slot. A slot's keys beyond its position hold whatever was there before (an
earlier request, the padding of a prefill bucket): the mask never lets a query see them.
Models are in the loop layout (`blocks/<i>`): a `scan_layers` checkpoint is converted at load
(`infra.serve.engine.load_model`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from infra.models.transformer import RESIDUAL_AXES, Attention, Transformer, dense
from infra.sharding import constrain

CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")  # logical names of a cache array


def attend(attn: Attention, q: jax.Array, keys: jax.Array, values: jax.Array,
           allowed: jax.Array) -> jax.Array:
    """Grouped-query attention of q (batch, t, heads, hd) over keys / values (batch, s,
    kv_heads, hd); ``allowed`` (batch, t, s) bool. Returns (batch, t, heads, hd)."""
    b, t = q.shape[:2]
    kv, hd = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // kv
    dt = attn.dtype
    q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)
    if t == 1:
        return _attend_one(q, keys, values, allowed, kv, group, dt)
    q = q.reshape(b, t, kv, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * group, hd)
    k, v = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # (batch, kv, s, hd)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)  # (batch, t, s)
    scores = scores + jnp.repeat(bias, group, axis=1)[:, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
    return out.reshape(b, kv, t, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, kv * group, hd)


def _attend_one(q, keys, values, allowed, kv, group, dt):
    """The decode case (one query per sequence) reading the cache in its own layout: products
    and sums instead of batched matmuls, which would first transpose (copy) every slot's whole
    cache to (batch, kv_heads, length, head_dim) each step."""
    b, _, _, hd = q.shape
    q = q.reshape(b, 1, kv, group, hd)
    scores = jnp.sum(q.astype(jnp.float32) * keys[:, :, :, None, :].astype(jnp.float32),
                     axis=-1)  # (batch, s, kv, group)
    bias = jnp.where(allowed[:, 0], 0.0, jnp.finfo(jnp.float32).min)  # (batch, s)
    probs = jax.nn.softmax(scores + bias[:, :, None, None], axis=1).astype(dt)
    out = jnp.sum(probs[..., None] * values[:, :, :, None, :], axis=1)  # (batch, kv, group, hd)
    return out.reshape(b, 1, kv * group, hd).astype(dt)


def _embed(model: Transformer, tokens: jax.Array) -> jax.Array:
    table = constrain(model.embedding[...], ("vocab", "act_embed"))
    return constrain(jnp.take(table, tokens, axis=0).astype(model.dtype), RESIDUAL_AXES)


def _logits(model: Transformer, x: jax.Array) -> jax.Array:
    x = model.final_norm(x)
    if model.tie_embeddings:
        return dense(x, model.embedding[...].astype(model.dtype), transpose_w=True,
                     preferred_element_type=jnp.float32)
    return dense(x, model.unembedding[...].astype(model.dtype), preferred_element_type=jnp.float32)


def _layer(block, x, positions, kv_update):
    """One pre-norm block; ``kv_update(k, v) -> (keys, values, allowed)`` stores this step's
    keys / values and returns what the queries attend to."""
    q, k, v = block.attn.project_qkv(block.attn_norm(x), positions)
    keys, values, allowed = kv_update(k, v)
    x = x + block.attn.project_out(attend(block.attn, q, keys, values, allowed))
    x = x + block.mlp(block.mlp_norm(x))
    return constrain(x, RESIDUAL_AXES)


def prefill(model: Transformer, cache: tuple[jax.Array, jax.Array], tokens: jax.Array,
            length: jax.Array, slot: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """Run one prompt, ``tokens`` (1, bucket) whose first ``length`` are real, and write its
    keys / values into ``slot``'s rows ``[0, bucket)`` of the cache. Returns the cache and the
    float32 logits (vocab,) at position ``length - 1``."""
    bucket = tokens.shape[1]
    positions = jnp.arange(bucket)[None]
    causal = (positions[0][:, None] >= positions[0][None, :])[None]  # (1, bucket, bucket)
    ks, vs = cache
    x = _embed(model, tokens)
    for i, block in enumerate(model.blocks):
        def update(k, v, i=i):
            nonlocal ks, vs
            at = (i, slot, 0, 0, 0)
            ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), at)
            vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), at)
            return k, v, causal

        x = _layer(block, x, positions, update)
    last = jax.lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)  # (1, 1, d_model)
    return (ks, vs), _logits(model, last)[0, 0]


def decode(model: Transformer, cache: tuple[jax.Array, jax.Array], tokens: jax.Array,
           positions: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One token per slot: ``tokens`` (slots,) at ``positions`` (slots,) are written into the
    cache and attend to their slot's keys ``[0, position]``. Returns the cache and float32
    logits (slots, vocab) for the next position."""
    ks, vs = cache
    slots, max_len = ks.shape[1], ks.shape[2]
    rows = jnp.arange(slots)
    allowed = (jnp.arange(max_len)[None, :] <= positions[:, None])[:, None]  # (slots, 1, len)
    x = _embed(model, tokens[:, None])
    for i, block in enumerate(model.blocks):
        def update(k, v, i=i):
            nonlocal ks, vs
            ks = ks.at[i, rows, positions].set(k[:, 0].astype(ks.dtype))
            vs = vs.at[i, rows, positions].set(v[:, 0].astype(vs.dtype))
            return ks[i], vs[i], allowed

        x = _layer(block, x, positions[:, None], update)
    return (ks, vs), _logits(model, x)[:, 0]
