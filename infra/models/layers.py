"""The two layouts of a transformer's layers, and the conversion between them.

With `model.scan_layers` the blocks are one stacked block whose parameters have a leading
`layers` dim (`blocks/...`); without it, one subtree per layer (`blocks/<i>/...`). The
parameters are the same numbers either way: a checkpoint saved in one layout is read in that
layout and converted (`infra.run.load_params`: serving, `init.from`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

LAYERS = "layers"  # logical name of the stacked-layers dimension in scan mode


def _loop_layout(blocks: dict) -> bool:
    return isinstance(blocks, dict) and (0 in blocks or "0" in blocks)


def restrict_like(other_layout: dict, params: dict) -> dict:
    """`other_layout` (a parameter tree in the other layer layout) less every parameter that
    `params` does not hold: e.g. the base weights of a LoRA model whose `params` are its base
    only."""
    def keep(tree, template):
        if not isinstance(tree, dict):
            return tree
        return {k: keep(v, template[k]) for k, v in tree.items() if k in template}

    blocks = params["blocks"]
    block = next(iter(blocks.values())) if _loop_layout(blocks) else blocks
    out = keep({k: v for k, v in other_layout.items() if k != "blocks"}, params)
    theirs = other_layout["blocks"]
    out["blocks"] = ({i: keep(b, block) for i, b in theirs.items()} if _loop_layout(theirs)
                     else keep(theirs, block))
    return out


def convert_layers(params: dict, num_layers: int, abstract_params: Any) -> dict:
    """Parameters of the loop layout (`blocks/<i>/...`) in the scan layout (`blocks/...` with a
    leading layers dim), or back, placed on `abstract_params`' shardings. Converted one weight
    at a time and the source arrays of `params` deleted as they are converted (they are
    consumed): the peak is the model plus one weight, not two models."""
    blocks = params["blocks"]
    shardings = traverse_util.flatten_dict(
        jax.tree.map(lambda a: a.sharding, abstract_params["blocks"]))
    if _loop_layout(blocks):
        layers = [traverse_util.flatten_dict(blocks[i] if i in blocks else blocks[str(i)])
                  for i in range(num_layers)]
        out = {}
        for name in layers[0]:
            sources = [layer[name] for layer in layers]
            out[name] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=shardings[name])(*sources)
            _delete(sources)
        new_blocks = traverse_util.unflatten_dict(out)
    else:
        per_layer: list[dict] = [{} for _ in range(num_layers)]
        for name, x in traverse_util.flatten_dict(blocks).items():
            parts = jax.jit(lambda x: [x[i] for i in range(num_layers)],
                            out_shardings=[shardings[(0, *name)]] * num_layers)(x)
            for i, part in enumerate(parts):
                per_layer[i][name] = part
            _delete([x])
        new_blocks = {i: traverse_util.unflatten_dict(d) for i, d in enumerate(per_layer)}
    return {**params, "blocks": new_blocks}


def _delete(arrays: list[jax.Array]) -> None:
    for x in arrays:
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """One block whose every Param is the layers' Params stacked along a new leading dim, with
    ``"layers"`` prepended to its ``out_sharding`` names (what ``nnx.vmap(...,
    transform_metadata={nnx.PARTITION_NAME: "layers"})`` does to its outputs).

    The layers are drawn exactly as in the loop layout (same keys, same order) rather than with
    ``nnx.vmap`` over split rngs, so ``scan_layers`` changes the program, not the initial model:
    the same seed gives the same weights (and the same training run) in both layouts.
    """
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in layers))
    stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS})
    return nnx.merge(graphdef, stacked)
