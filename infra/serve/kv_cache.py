"""The paged KV cache's arrays, and how a layer's keys and values are written into and read from
them (`infra.serve.forward`).

Keys and values are ``[layers, num_pages, page_size, kv_heads, head_dim]``, in the model's
compute dtype, or (``kv_cache="int8"``, `serve --kv_cache int8`) as int8 with one scale per
(position, kv head): absmax over head_dim, the layout of vLLM's and JetStream's int8 caches at
per-token granularity. That holds a position in ``head_dim + 4`` bytes per head instead of
``4 * head_dim`` (float32) or ``2 * head_dim`` (bfloat16); reads dequantize the gathered pages
to the compute dtype before attention. The cache is a dict of arrays: ``k``, ``v`` and, for
int8, ``k_scale``, ``v_scale`` (``[..., kv_heads, 1]``, float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import qwix

from infra.errors import UserError

#: `serve --kv_cache`: the cache's storage (``auto``: the model's compute dtype)
KV_FORMATS = ("auto", "int8")
# logical names of a cache array: (layers, slots or pages, positions, kv heads, head_dim); the
# layers stay whole (serving has no pipeline stages), kv heads follow the weights' `tensor`
AXES = (None, None, None, "kv_heads", "head_dim")
Cache = dict[str, jax.Array]


def abstract(shape: tuple[int, ...], dtype, kv_format: str,
             sharding: Callable[[tuple, tuple], jax.sharding.Sharding]) -> Cache:
    """The cache's arrays as ShapeDtypeStructs: `shape` = (layers, pages, page_size, kv_heads,
    head_dim); ``sharding(logical_axes, shape)`` places each."""
    if kv_format not in KV_FORMATS:
        raise UserError(f"--kv_cache must be one of {', '.join(KV_FORMATS)}, got {kv_format!r}")

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(AXES, shape))

    if kv_format == "auto":
        return {"k": array(shape, dtype), "v": array(shape, dtype)}
    scales = (*shape[:-1], 1)
    return {"k": array(shape, jnp.int8), "v": array(shape, jnp.int8),
            "k_scale": array(scales, jnp.float32), "v_scale": array(scales, jnp.float32)}


def zeros(spec: Cache) -> Cache:
    """The cache of `spec` (`abstract`), allocated on its devices."""
    return {name: jax.jit(lambda s=s: jnp.zeros(s.shape, s.dtype), out_shardings=s.sharding)()
            for name, s in spec.items()}


def nbytes(spec: Cache) -> int:
    """Device bytes of the whole cache."""
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in spec.values())


def write(cache: Cache, layer: int, pages: jax.Array, offsets: jax.Array, k: jax.Array,
          v: jax.Array) -> Cache:
    """`cache` with positions (``pages``, ``offsets``), any matching leading shape, of `layer`
    set to keys `k` and values `v` (that shape + (kv_heads, head_dim))."""
    out = dict(cache)
    for name, x in (("k", k), ("v", v)):
        if f"{name}_scale" in cache:  # absmax over head_dim, as the int8 serving weights
            q = qwix.quantize(x.astype(jnp.float32), "int8",
                              channelwise_axes=tuple(range(x.ndim - 1)))
            out[f"{name}_scale"] = out[f"{name}_scale"].at[layer, pages, offsets].set(q.scale)
            x = q.qvalue
        out[name] = out[name].at[layer, pages, offsets].set(x.astype(cache[name].dtype))
    return out


def read(cache: Cache, layer: int, table: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The keys and values of the sequences whose pages `table` (batch, pages) lists, in `layer`:
    (batch, pages * page_size, kv_heads, head_dim) each, in `dtype`."""
    def gather(x):
        x = x[layer][table]
        return x.reshape(table.shape[0], -1, *x.shape[3:])

    out = []
    for name in ("k", "v"):
        x = gather(cache[name])
        if f"{name}_scale" in cache:
            x = x.astype(jnp.float32) * gather(cache[f"{name}_scale"])
        out.append(x.astype(dtype))
    return out[0], out[1]
