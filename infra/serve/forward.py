"""The transformer's forward pass against a KV cache: prefill chunks of prompts, decode every slot.

The model computes everything (`Transformer.embed`, its blocks with `Attention`'s one
`attend`, `Transformer.logits`); this module only says where each layer's keys and values go
in the cache and which of them each query may see, so cached logits equal a full forward pass
to float32 rounding (tests/test_serve_engine.py checks 1e-5).

The cache is paged: keys and values ``[layers, num_pages, page_size, kv_heads, head_dim]``
(`infra.serve.kv_cache`: float, or int8 with scales); a sequence's positions are its pages in
the order of its block-table row (`infra.serve.pages`), gathered for attention. A sequence's
keys beyond its position hold whatever was there before (an earlier request): the mask never lets a query see them. With
``page_size`` = the context and one page per slot this is the dense cache of earlier versions.
Models are in the loop layout (`blocks/<i>`): a `scan_layers` checkpoint is converted at load
(`infra.serve.loading.load_model`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infra.models.transformer import Transformer
from infra.serve import kv_cache, sampling
from infra.serve.kv_cache import Cache
from infra.serve.pages import TRASH

SCORE_BLOCK = 256  # prompt positions whose logits `prompt_logprobs` computes at once


def prefill(model: Transformer, cache: Cache, tokens: jax.Array, start: jax.Array,
            length: jax.Array, table: jax.Array) -> tuple[Cache, jax.Array, jax.Array]:
    """Run one chunk of each of several prompts: row ``r`` of ``tokens`` (rows, chunk) holds
    positions ``start[r]`` + [0, chunk) of the sequence whose pages ``table[r]`` (rows, pages)
    lists, of which the first ``length[r]`` are real. Keys / values go into those pages (the
    padding's into the trash page); each chunk attends to its sequence's positions up to its
    own (earlier chunks and cached prefix pages included). Returns the cache, the float32
    logits (rows, vocab) at each row's last real position and the residual stream (rows,
    chunk, d_model) after the last block (for `prompt_logprobs`)."""
    rows, chunk = tokens.shape
    size = cache["k"].shape[2]
    index = jnp.arange(chunk)[None]
    positions = start[:, None] + index  # (rows, chunk)
    page_of = jnp.minimum(positions // size, table.shape[1] - 1)
    pages = jnp.where(index < length[:, None],
                      jnp.take_along_axis(table, page_of, axis=1), TRASH)
    offsets = positions % size
    seen = table.shape[1] * size
    allowed = jnp.arange(seen)[None, None, :] <= positions[:, :, None]  # (rows, chunk, seen)

    def layer(i: int):
        def update(k, v):
            nonlocal cache
            cache = kv_cache.write(cache, i, pages, offsets, k, v)
            return *kv_cache.read(cache, i, table, k.dtype), allowed
        return update

    x = model.cached_layers(model.embed(tokens), positions, layer)
    last = x[jnp.arange(rows), jnp.maximum(length - 1, 0)][:, None]  # (rows, 1, d_model)
    return cache, model.logits(last)[:, 0], x


def prompt_logprobs(model: Transformer, x: jax.Array, targets: jax.Array, allowed: jax.Array,
                    k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What each prompt position predicts for the next: the log-probability of ``targets[i]``
    (the prompt token after position ``i``) and the top ``k`` (ids, log-probabilities) at each
    position ``i`` of the residual stream ``x`` (1, bucket, d_model); (bucket,), (bucket, k),
    (bucket, k). The output
    projection runs over blocks of `SCORE_BLOCK` positions, so that (block, vocab) logits exist
    at a time, not (bucket, vocab)."""
    bucket, d = x.shape[1], x.shape[2]
    block = min(SCORE_BLOCK, bucket)
    blocks = -(-bucket // block)
    pad = blocks * block - bucket
    targets = jnp.pad(targets, (0, pad)).reshape(blocks, block)
    xs = jnp.pad(x[0], ((0, pad), (0, 0))).reshape(blocks, 1, block, d)

    def score(args):
        xb, tb = args
        return sampling.logprobs_of(model.logits(xb)[0], tb, allowed, k)

    chosen, ids, values = jax.lax.map(score, (xs, targets))
    return chosen.reshape(-1)[:bucket], ids.reshape(-1, k)[:bucket], values.reshape(-1, k)[:bucket]


def decode(model: Transformer, cache: Cache, tokens: jax.Array, positions: jax.Array,
           active: jax.Array, table: jax.Array) -> tuple[Cache, jax.Array]:
    """One token per slot: ``tokens`` (slots,) at ``positions`` (slots,) are written into each
    active slot's pages (``table`` (slots, pages); an inactive slot's into the trash page) and
    attend to their sequence's positions ``[0, position]``. Returns the cache and float32
    logits (slots, vocab) for the next position."""
    size = cache["k"].shape[2]
    slots = tokens.shape[0]
    pages = jnp.where(active, table[jnp.arange(slots), positions // size], TRASH)
    offsets = positions % size
    seen = table.shape[1] * size
    allowed = (jnp.arange(seen)[None, :] <= positions[:, None])[:, None]  # (slots, 1, seen)

    def layer(i: int):
        def update(k, v):
            nonlocal cache
            cache = kv_cache.write(cache, i, pages, offsets, k[:, 0], v[:, 0])
            return *kv_cache.read(cache, i, table, k.dtype), allowed
        return update

    x = model.cached_layers(model.embed(tokens[:, None]), positions[:, None], layer)
    return cache, model.logits(x)[:, 0]
