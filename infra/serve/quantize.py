"""Post-training int8 weights for serving (`serve --quantize int8`).

Each projection weight (q, k, v, o and the MLP's gate, up, down: the weights a module lists in
``lora_targets``) becomes a `qwix.QArray`: int8 values of the weight's shape and one scale per
output channel (absmax over the input dims), placed with the weight's own sharding (the scale's
input dims, of size 1, unsplit). `infra.models.projection.project` multiplies by it; the
activations stay in the compute dtype. Embeddings, norms, biases, adapters and experts stay as
they are. The float weight is freed as its int8 copy is made, so the peak is the float model
plus one weight. The checkpoint is not touched: quantization happens at every load.
"""

from __future__ import annotations

import jax
import qwix
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from infra.errors import UserError
from infra.models import lora

#: `serve --quantize`: what the projection weights are served as
WEIGHT_FORMATS = ("none", "int8")


def quantize_weights(params: dict, model_def, mode: str) -> dict:
    """`params` (the serving layout's tree, as `infra.serve.loading.load_model` gives it) with
    every projection weight in `mode` (``"none"``: unchanged)."""
    if mode not in WEIGHT_FORMATS:
        raise UserError(f"--quantize must be one of {', '.join(WEIGHT_FORMATS)}, got {mode!r}")
    if mode == "none":
        return params
    flat = traverse_util.flatten_dict(params)
    targets = {path: n_in for path, _, _, n_in in lora.adaptable(model_def.merge(params))}
    for key, w in flat.items():
        n_in = targets.get("/".join(str(k) for k in key))
        if n_in is not None:
            flat[key] = _int8(w, n_in)
            w.delete()
    return traverse_util.unflatten_dict(flat)


def _int8(w: jax.Array, n_in: int) -> qwix.QArray:
    """``w`` as int8 with a scale per output channel, on ``w``'s devices and sharding."""
    spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
    scale_spec = P(*((None,) * n_in + spec[n_in:]))
    out = (w.sharding, NamedSharding(w.sharding.mesh, scale_spec))
    outputs = list(range(n_in, w.ndim))

    def quantize(w):
        q = qwix.quantize(w, "int8", channelwise_axes=outputs)
        return q.qvalue, q.scale

    qvalue, scale = jax.jit(quantize, out_shardings=out)(w)
    return qwix.QArray(qvalue=qvalue, scale=scale, zero_point=None, qtype="int8")


def weight_bytes(params: dict) -> tuple[int, int]:
    """(device bytes of the quantized weights, int8 values and scales; their bytes in float32),
    for the engine's log and the tests."""
    quantized = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qwix.QArray))
                 if isinstance(x, qwix.QArray)]
    return (sum(x.qvalue.nbytes + x.scale.nbytes for x in quantized),
            sum(x.qvalue.size * 4 for x in quantized))
