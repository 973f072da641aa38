"""Fused attention kernels behind `attend` (`model.attention`): the Pallas splash kernel
(TPU), cuDNN's fused attention (GPU, through `jax.nn.dot_product_attention`), or our own XLA
attention (every backend; `infra.models.attention`).

    xla     our einsum attention (the reference; what CPU runs)
    splash  jax.experimental.pallas.ops.tpu.splash_attention: causal and packed-segment
            masks, grouped-query attention as one MQA kernel per kv head; it does not scale q,
            so `attend` passes q already scaled. Sharded over batch and heads with the
            logical-axis rules (shard_map); activations split over `length` are refused.
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): causal, packed segments as a
            boolean mask
    auto    splash on TPU, cudnn on GPU (16-bit compute), xla elsewhere

Asking for a kernel the devices lack is one ConfigError naming the key (`resolve`), raised
when the run is built. A KV cache's explicit mask (serving) always runs the XLA attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from infra import sharding
from infra.errors import ConfigError
from infra.models.transformer_config import ATTENTION_BACKENDS as BACKENDS
_NEEDS = {"splash": "tpu", "cudnn": "gpu"}
SPLASH_BLOCK = 512  # the splash kernel's query / key block (smaller for shorter sequences)


def resolve(name: str, platform: str, dtype=None) -> str:
    """The backend `model.attention = name` means on devices of `platform` (cpu, gpu, tpu)
    for a compute `dtype` (cuDNN's fused attention takes 16-bit floats only: `auto` then
    keeps XLA's)."""
    half = dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if name == "auto":
        return {"tpu": "splash", "gpu": "cudnn" if half else "xla"}.get(platform, "xla")
    if name not in BACKENDS:
        raise ConfigError(f"model.attention must be one of {', '.join(BACKENDS)}, got {name!r}",
                          key="model.attention", value="auto")
    need = _NEEDS.get(name)
    if need is not None and platform != need:
        raise ConfigError(f"model.attention={name} needs {need.upper()} devices but this run's "
                          f"are {platform}", key="model.attention", value="auto")
    if name == "cudnn" and not half:
        raise ConfigError(f"model.attention=cudnn needs a 16-bit compute dtype, not "
                          f"{jnp.dtype(dtype).name}", key="model.dtype", value="bfloat16")
    return name


def splash(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
           segment_ids: jax.Array | None, interpret: bool = False) -> jax.Array:
    """q (batch, t, heads, hd), already scaled; k, v (batch, t, kv_heads, hd) -> (batch, t,
    heads, hd), with the splash kernel, sharded over batch and heads under the active rules."""
    active = sharding.active_rules()
    if active is None or active[0].size == 1:
        return _splash_local(q, k, v, segment_ids, causal=causal, interpret=interpret)
    mesh, rules = active
    rows = sharding.logical_to_spec(("batch", "length", "act_heads", "head_dim"), rules)
    kv_rows = sharding.logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"), rules)
    if sharding.activation_shards("length") > 1:
        raise ConfigError("model.attention=splash does not run on activations split over "
                          "length (the sequence mesh axis)", key="model.attention", value="xla")
    if sharding.activation_shards("act_heads") != sharding.activation_shards("act_kv_heads"):
        raise ConfigError("model.attention=splash needs the kv heads split like the query heads "
                          "(num_kv_heads a multiple of the tensor axis)", key="model.attention",
                          value="xla")
    seg_spec = P(rows[0], None)
    local = functools.partial(_splash_local, causal=causal, interpret=interpret)
    if segment_ids is None:
        return jax.shard_map(lambda a, b, c: local(a, b, c, None), mesh=mesh,
                             in_specs=(rows, kv_rows, kv_rows), out_specs=rows,
                             check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, kv_rows, kv_rows, seg_spec),
                         out_specs=rows, check_vma=False)(q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, *, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

    b, t, heads, hd = q.shape
    kv = k.shape[2]
    group = heads // kv
    block = min(SPLASH_BLOCK, t)
    if t % block or k.shape[1] != t:
        raise ConfigError(f"model.attention=splash needs the sequence length ({t}) to be a "
                          f"multiple of {block} with keys at the queries' positions",
                          key="model.attention", value="xla")
    one = mask_lib.CausalMask((t, t)) if causal else mask_lib.FullMask((t, t))
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block,
                                  block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    kernel = kernel_lib.make_splash_mqa_single_device(
        mask_lib.MultiHeadMask([one] * group), block_sizes=sizes, interpret=interpret)
    qh = q.reshape(b, t, kv, group, hd).transpose(0, 2, 3, 1, 4)  # (b, kv, group, t, hd)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kv, t, hd)

    def row(q1, k1, v1, seg):  # one sequence: an MQA kernel per kv head
        ids = None if seg is None else kernel_lib.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(q1, k1, v1)

    if segment_ids is None:
        out = jax.vmap(lambda a, b_, c: row(a, b_, c, None))(qh, kh, vh)
    else:
        out = jax.vmap(row)(qh, kh, vh, segment_ids.astype(jnp.int32))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, hd).astype(q.dtype)


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
          segment_ids: jax.Array | None, implementation: str | None = "cudnn") -> jax.Array:
    """q (batch, t, heads, hd), already scaled; k, v (batch, s, kv_heads, hd): the fused
    attention of `jax.nn.dot_product_attention` (`implementation=None` lets JAX choose: the
    tests run the same call with XLA on CPU)."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, is_causal=causal,
                                        implementation=implementation).astype(q.dtype)
