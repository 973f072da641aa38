"""Scaled dot-product attention: the one implementation every caller uses (training, packed
fine-tuning, encoders, serving's prefill and decode). An attention backend (a fused kernel)
plugs in here.

`attend(q, k, v, mask)` takes q (batch, t, heads, head_dim) and k, v (batch, s, kv_heads,
head_dim) (grouped-query: query head n reads kv head n // group) and returns (batch, t, heads,
head_dim). Scores are float32, the mask is additive, the probabilities are cast to the compute
dtype before they weigh the values. `Mask` says which keys each query may see:

* `Mask(causal=True, positions=...)`: keys at global positions up to the query's (training;
  positions stay global when `length` is split over the `sequence` mesh axis);
* `Mask(causal=..., segment_ids=...)`: packed rows, a query sees its own segment only;
* `Mask(allowed=...)`: an explicit (batch, t, s) boolean (a KV cache: slots at their own
  positions).

Layout. The two matmuls run head-major, (batch, kv_heads, rows, head_dim) with query rows
(position, group member) position-major: on XLA:CPU this with an additive mask halves the
forward + backward time of einsums in (batch, length, heads) order. With `query_blocks` the
queries are processed in blocks; when keys and queries are the same positions (`Mask.aligned`)
a block skips the keys after its end, which the causal mask would zero. One query per sequence
(decode) reads the cache in its own layout instead (`_attend_one`), so no step transposes every
slot's cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from infra import sharding
from infra.models import attention_kernels as kernels

NEG = float(jnp.finfo(jnp.float32).min)  # the additive mask of a hidden key


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees (see the module docstring); built inside traced code."""

    causal: bool = False
    positions: jax.Array | None = None  # (t,) global positions, causal without segments
    segment_ids: jax.Array | None = None  # (batch, t): packed rows
    allowed: jax.Array | None = None  # (batch, t, s) bool: explicit (a KV cache)

    @property
    def aligned(self) -> bool:
        """Keys are the queries' own positions: a causal block needs no key after its end."""
        return self.allowed is None and self.causal

    def bias(self, start: int, end: int, keys: int, group: int) -> jax.Array | None:
        """The additive bias of query positions [start, end) over the first `keys` keys,
        broadcastable to (batch, kv_heads, rows, keys); None when every key is visible."""
        if self.allowed is not None:
            allowed = self.allowed[:, start:end, :keys]
        elif self.segment_ids is not None:
            seg = self.segment_ids
            allowed = seg[:, start:end, None] == seg[:, None, :keys]
            if self.causal:  # by index: positions restart in every segment
                index = jnp.arange(keys)
                allowed = allowed & (index[start:end, None] >= index[None, :])
        elif self.causal:
            positions = self.positions
            allowed = positions[start:end, None] >= positions[None, :keys]
            return jnp.repeat(jnp.where(allowed, 0.0, NEG), group, axis=0)  # (rows, keys)
        else:
            return None
        return jnp.repeat(jnp.where(allowed, 0.0, NEG), group, axis=1)[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *, dtype,
           query_blocks: list[tuple[int, int]] | None = None, backend: str = "xla",
           interpret: bool = False) -> jax.Array:
    """Grouped-query attention (see the module docstring); `query_blocks`: position ranges of
    the query blocks (default: one); `backend`: `model.attention` (a fused kernel for the
    training masks, `infra.models.attention_kernels`; `interpret`: Pallas kernels interpreted,
    on CPU, for tests)."""
    b, t, heads, hd = q.shape
    kv, s = k.shape[2], k.shape[1]
    group = heads // kv
    q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)
    kernel = (backend if interpret or backend == "xla"
              else kernels.resolve(backend, _platform(), dtype))
    if kernel != "xla" and mask.allowed is None:
        fused = kernels.splash if kernel == "splash" else kernels.cudnn
        options = {"interpret": interpret} if kernel == "splash" else {}
        return fused(q, k, v, causal=mask.causal, segment_ids=mask.segment_ids,
                     **options).astype(dtype)
    if t == 1 and mask.allowed is not None:
        return _attend_one(q, k, v, mask.allowed, group, dtype)
    q = q.reshape(b, t, kv, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * group, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (batch, kv_heads, s, hd)
    outs = []
    for start, end in query_blocks or [(0, t)]:
        keys = end if mask.aligned else s
        rows = slice(start * group, end * group)
        scores = jnp.einsum("bkqh,bksh->bkqs", q[:, :, rows], k[:, :, :keys],
                            preferred_element_type=jnp.float32)
        bias = mask.bias(start, end, keys, group)
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        outs.append(jnp.einsum("bkqs,bksh->bkqh", probs, v[:, :, :keys]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out.reshape(b, kv, t, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, heads, hd)


def _platform() -> str:
    """The platform attention runs on: the active mesh's devices, else JAX's default."""
    active = sharding.active_rules()
    return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def _attend_one(q, keys, values, allowed, group, dtype):
    """One query per sequence (decode), reading keys / values (batch, s, kv_heads, hd) in their
    own layout: products and sums instead of batched matmuls, which would first transpose
    (copy) every sequence's whole cache each step."""
    b, _, _, hd = q.shape
    kv = keys.shape[2]
    q = q.reshape(b, 1, kv, group, hd)
    scores = jnp.sum(q.astype(jnp.float32) * keys[:, :, :, None, :].astype(jnp.float32),
                     axis=-1)  # (batch, s, kv, group)
    bias = jnp.where(allowed[:, 0], 0.0, NEG)  # (batch, s)
    probs = jax.nn.softmax(scores + bias[:, :, None, None], axis=1).astype(dtype)
    out = jnp.sum(probs[..., None] * values[:, :, :, None, :], axis=1)  # (batch, kv, group, hd)
    return out.reshape(b, 1, kv * group, hd).astype(dtype)


def uncounted_flops_per_token(model, seq_len: int, platform: str) -> float:
    """Training FLOPs per token that XLA's count of the compiled step misses on `platform`: a
    fused kernel's attention (a custom call XLA cannot see into), counted as XLA counts `xla`
    attention of the same shapes, forward and backward, causal query blocks included; 0 when
    XLA's own attention runs. `model`: a `TransformerConfig` (causal attention)."""
    if kernels.resolve(model.attention, platform, model.dtype) == "xla":
        return 0.0
    return model.num_layers * _xla_attention_flops(
        seq_len, model.num_heads, model.num_kv_heads, model.head_dim,
        min(model.causal_blocks, seq_len), jnp.dtype(model.dtype).name) / seq_len


@functools.lru_cache(maxsize=16)
def _xla_attention_flops(length: int, heads: int, kv_heads: int, head_dim: int, blocks: int,
                         dtype: str) -> float:
    """XLA's FLOPs of one sequence's causal `xla` attention, forward and backward (compiled
    for abstract shapes, nothing run)."""
    from infra import utilization

    q = jax.ShapeDtypeStruct((1, length, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, length, kv_heads, head_dim), dtype)
    edges = [round(i * length / blocks) for i in range(blocks + 1)]
    mask = Mask(causal=True, positions=jnp.arange(length))

    def loss(q, k, v, incoming):
        out = attend(q, k, v, mask, dtype=jnp.dtype(dtype),
                     query_blocks=list(zip(edges[:-1], edges[1:])), backend="xla")
        return (out * incoming).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return utilization.compiled_flops(grads.lower(q, kv, kv, q).compile()) or 0.0
