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
    leading layers dim), or back, placed on `abstract_params`' shardings."""
    blocks = params["blocks"]
    if _loop_layout(blocks):
        layers = [blocks[i] if i in blocks else blocks[str(i)] for i in range(num_layers)]
        convert = lambda ls: jax.tree.map(lambda *xs: jnp.stack(xs), *ls)  # noqa: E731
    else:
        layers = blocks
        convert = lambda b: {i: jax.tree.map(lambda x: x[i], b) for i in range(num_layers)}  # noqa: E731
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params["blocks"])
    new_blocks = jax.jit(convert, out_shardings=shardings)(layers)
    return {**params, "blocks": new_blocks}
