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


def convert_layers(params: dict, num_layers: int, abstract_params: Any) -> dict:
    """Parameters of the loop layout (`blocks/<i>/...`) in the scan layout (`blocks/...` with a
    leading layers dim), or back, placed on `abstract_params`' shardings."""
    blocks = params["blocks"]
    if isinstance(blocks, dict) and 0 in blocks or "0" in blocks:
        layers = [blocks[i] if i in blocks else blocks[str(i)] for i in range(num_layers)]
        convert = lambda ls: jax.tree.map(lambda *xs: jnp.stack(xs), *ls)  # noqa: E731
    else:
        layers = blocks
        convert = lambda b: {i: jax.tree.map(lambda x: x[i], b) for i in range(num_layers)}  # noqa: E731
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params["blocks"])
    new_blocks = jax.jit(convert, out_shardings=shardings)(layers)
    return {**params, "blocks": new_blocks}
