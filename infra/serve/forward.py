"""The transformer's forward pass against a KV cache: prefill one prompt, decode every slot.

The model computes everything (`Transformer.embed`, its blocks with `Attention`'s one
`attend`, `Transformer.logits`); this module only says where each layer's keys and values go
in the cache and which of them each query may see, so cached logits equal a full forward pass
to float32 rounding (tests/test_serve_engine.py checks 1e-5).

The cache is two arrays ``[layers, slots, max_len, kv_heads, head_dim]`` (keys, values),
contiguous per slot. A slot's keys beyond its position hold whatever was there before (an
earlier request, the padding of a prefill bucket): the mask never lets a query see them.
Models are in the loop layout (`blocks/<i>`): a `scan_layers` checkpoint is converted at load
(`infra.serve.engine.load_model`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infra.models.transformer import Transformer
from infra.serve import sampling

SCORE_BLOCK = 256  # prompt positions whose logits `prompt_logprobs` computes at once
CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")  # logical names of a cache array
Cache = tuple[jax.Array, jax.Array]


def prefill(model: Transformer, cache: Cache, tokens: jax.Array, length: jax.Array,
            slot: jax.Array) -> tuple[Cache, jax.Array, jax.Array]:
    """Run one prompt, ``tokens`` (1, bucket) whose first ``length`` are real, and write its
    keys / values into ``slot``'s rows ``[0, bucket)`` of the cache. Returns the cache, the
    float32 logits (vocab,) at position ``length - 1`` and the residual stream (1, bucket,
    d_model) after the last block (for `prompt_logprobs`)."""
    bucket = tokens.shape[1]
    positions = jnp.arange(bucket)[None]
    causal = (positions[0][:, None] >= positions[0][None, :])[None]  # (1, bucket, bucket)
    ks, vs = cache

    def layer(i: int):
        def update(k, v):
            nonlocal ks, vs
            at = (i, slot, 0, 0, 0)
            ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), at)
            vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), at)
            return k, v, causal  # the prompt attends to its own keys
        return update

    x = model.cached_layers(model.embed(tokens), positions, layer)
    last = jax.lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)  # (1, 1, d_model)
    return (ks, vs), model.logits(last)[0, 0], x


def prompt_logprobs(model: Transformer, x: jax.Array, tokens: jax.Array, allowed: jax.Array,
                    k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What each prompt position predicts for the next: the log-probability of ``tokens[0, i +
    1]`` and the top ``k`` (ids, log-probabilities) at each position ``i`` of the residual
    stream ``x`` (1, bucket, d_model); (bucket,), (bucket, k), (bucket, k). The output
    projection runs over blocks of `SCORE_BLOCK` positions, so that (block, vocab) logits exist
    at a time, not (bucket, vocab)."""
    bucket, d = x.shape[1], x.shape[2]
    block = min(SCORE_BLOCK, bucket)
    blocks = -(-bucket // block)
    pad = blocks * block - bucket
    targets = jnp.pad(jnp.roll(tokens[0], -1), (0, pad)).reshape(blocks, block)
    xs = jnp.pad(x[0], ((0, pad), (0, 0))).reshape(blocks, 1, block, d)

    def score(args):
        xb, tb = args
        return sampling.logprobs_of(model.logits(xb)[0], tb, allowed, k)

    chosen, ids, values = jax.lax.map(score, (xs, targets))
    return chosen.reshape(-1)[:bucket], ids.reshape(-1, k)[:bucket], values.reshape(-1, k)[:bucket]


def decode(model: Transformer, cache: Cache, tokens: jax.Array,
           positions: jax.Array) -> tuple[Cache, jax.Array]:
    """One token per slot: ``tokens`` (slots,) at ``positions`` (slots,) are written into the
    cache and attend to their slot's keys ``[0, position]``. Returns the cache and float32
    logits (slots, vocab) for the next position."""
    ks, vs = cache
    slots, max_len = ks.shape[1], ks.shape[2]
    rows = jnp.arange(slots)
    allowed = (jnp.arange(max_len)[None, :] <= positions[:, None])[:, None]  # (slots, 1, len)

    def layer(i: int):
        def update(k, v):
            nonlocal ks, vs
            ks = ks.at[i, rows, positions].set(k[:, 0].astype(ks.dtype))
            vs = vs.at[i, rows, positions].set(v[:, 0].astype(vs.dtype))
            return ks[i], vs[i], allowed
        return update

    x = model.cached_layers(model.embed(tokens[:, None]), positions[:, None], layer)
    return (ks, vs), model.logits(x)[:, 0]
