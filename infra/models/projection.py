"""The one matmul every projection weight goes through: float, quantization-aware, or on int8
weights.

`dense` is the plain product. `project` adds low precision by qwix (the JAX quantization
library), chosen per call:

- ``quantization="int8" | "fp8"`` (`model.quantization`, training): quantization-aware. The
  activation is quantized per token and the weight per output channel (absmax scales), in int8
  or float8 e4m3, and the product is taken on the quantized values, so the loss sees the
  rounding the deployed model will. With ``backward=True`` (`model.quantize_backward`) the
  incoming gradients of both backward matmuls are quantized too (int8, or float8 e5m2 for fp8).
  Parameters, checkpoints and exports stay float: only the product is quantized.
- a weight that is a `qwix.QArray` (post-training int8 weights for serving,
  `infra.serve.quantize`): the int8 values and their per-output-channel scales go into the
  product; the activation stays float.

Why qwix's functions and not its `quantize_model` interception: interception recognises a
weight by finding the very array among the module's parameters, but `dense` multiplies a 2-D
reshape of it (a CPU speed-up, below), which it would treat as an activation. Calling qwix's
quantized ``dot_general`` here names the weight explicitly, and works the same in the loop and
scan layouts, under LoRA and under any sharding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import qwix
# qwix exports quantization-aware training only through its model interception (see above);
# its quantized dot_general with the custom backward is this module (qwix 0.1.x).
from qwix._src.core.dot_general_qt import DotGeneralQtConfig, dot_general_qt

# (forward, backward) types of each mode: e4m3 keeps precision for values, e5m2 range for
# gradients (the usual fp8 training recipe)
_QTYPES = {"int8": ("int8", "int8"), "fp8": (jnp.float8_e4m3fn, jnp.float8_e5m2)}


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, *, transpose_w: bool = False,
          preferred_element_type=None) -> jax.Array:
    """``x (..., *w.shape[:n_in]) . w -> (..., *w.shape[n_in:])``, computed as one 2-D matmul.

    Tokens are flattened into one leading dim first. The result is the same as the N-D einsum,
    but XLA's CPU backend gives a weight gradient that contracts over (batch, length) a
    transpose of the whole activation per matmul (24% of the bench GPT's step); as a 2-D dot it
    needs none. Reshapes of row-major leading dims are free (bitcasts), and the sharding of the
    merged (batch * length) dim is that of batch and length together. ``transpose_w``: ``w`` is
    stored (out, in), as a tied embedding table is; the transpose is folded into the dot.
    """
    return _dense2d(x, w, n_in, transpose_w, lambda a, b, dims: jax.lax.dot_general(
        a, b, dims, preferred_element_type=preferred_element_type))


def project(x: jax.Array, w, n_in: int = 1, *, quantization: str = "none",
            backward: bool = False) -> jax.Array:
    """`dense` of a projection weight (cast to ``x``'s dtype), in the precision above."""
    if isinstance(w, qwix.QArray):
        k = math.prod(w.qvalue.shape[:n_in])
        w2 = qwix.QArray(qvalue=w.qvalue.reshape(k, -1), scale=w.scale.reshape(1, -1),
                         zero_point=None, qtype=w.qtype)
        lead, out_shape = x.shape[:x.ndim - n_in], w.qvalue.shape[n_in:]
        y = qwix.dot_general(x.reshape(-1, k), w2, (((1,), (0,)), ((), ())))
        return y.astype(x.dtype).reshape(*lead, *out_shape)
    w = w.astype(x.dtype)
    if quantization == "none":
        return dense(x, w, n_in)
    forward_type, backward_type = _QTYPES[quantization]
    grads = backward_type if backward else None
    config = DotGeneralQtConfig(lhs_qtype=forward_type, rhs_qtype=forward_type,
                                dlhs_grad_qtype=grads, drhs_grad_qtype=grads,
                                use_original_residuals=not backward)
    return _dense2d(x, w, n_in, False,
                    lambda a, b, dims: dot_general_qt(a, b, dims, config).astype(x.dtype))


def _dense2d(x, w, n_in: int, transpose_w: bool, dot) -> jax.Array:
    lead = x.shape[: x.ndim - n_in]
    if transpose_w:
        out_shape, k = w.shape[:-n_in], math.prod(w.shape[w.ndim - n_in:])
        w2, dims = w.reshape(-1, k), (((1,), (1,)), ((), ()))
    else:
        out_shape, k = w.shape[n_in:], math.prod(w.shape[:n_in])
        w2, dims = w.reshape(k, -1), (((1,), (0,)), ((), ()))
    return dot(x.reshape(-1, k), w2, dims).reshape(*lead, *out_shape)
