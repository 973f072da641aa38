"""Per-slot sampling: temperature, top-k and top-p (nucleus), with keys that depend only on the
request's seed and the position of the token being drawn.

Each slot carries its own parameters, so one jitted step serves greedy and sampled requests
together. The key of the token at position ``p`` is ``fold_in(key(seed), p)``: nothing about
the other slots, the slot index or the step count enters, so a seeded request gives the same
text in any slot, alone or in a full batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SEED_MAX = 2**63 - 1


def seed_words(seed: int) -> np.ndarray:
    """The raw threefry key data (2 uint32 words) of ``jax.random.key(seed)`` for a seed in
    [0, 2**63): built on the host, so 64-bit seeds need no jax x64 mode."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def keys_at(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """Typed keys (slots,) from raw seed words (slots, 2) and token positions (slots,)."""
    base = jax.random.wrap_key_data(seeds, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(base, positions.astype(jnp.uint32))


def sample(logits: jax.Array, allowed: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, keys: jax.Array) -> jax.Array:
    """Tokens (slots,) int32 from float32 ``logits`` (slots, vocab).

    ``allowed`` (vocab,) bool: ids that may be drawn at all (never PAD or the padding of the
    vocabulary). Temperature 0 is greedy (argmax). Otherwise the logits are divided by the
    temperature, restricted to the ``top_k`` largest (0 = all), then to the smallest set whose
    probability reaches ``top_p`` (1 = all), and one id is drawn with the slot's key.
    """
    vocab = logits.shape[-1]
    logits = jnp.where(allowed[None], logits.astype(jnp.float32), -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ranked = jnp.where(jnp.arange(vocab)[None] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # the smallest kept value: the last rank whose preceding mass is below top_p (rank 0 always)
    keep_rank = (mass_before < top_p[:, None]) & (jnp.arange(vocab)[None] < k[:, None])
    last = jnp.maximum(jnp.sum(keep_rank, axis=-1) - 1, 0)
    floor = jnp.maximum(kth, jnp.take_along_axis(ordered, last[:, None], axis=-1))
    filtered = jnp.where(scaled >= floor, scaled, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def logprobs_of(logits: jax.Array, tokens: jax.Array, allowed: jax.Array,
               k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under `logits` (batch, vocab): of `tokens` (batch,), and the `k` most
    likely ids that may be drawn (`allowed`) with theirs, most likely first ((batch, k) int32 and
    float32). The model's distribution itself: float32 log-softmax over the whole vocabulary,
    before temperature and top-k / top-p."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(jnp.where(allowed[None], logp, -jnp.inf), k)
    return chosen, top_ids.astype(jnp.int32), top_values
