"""Several LoRA adapters over one base model in one engine (`serve --adapter name=workdir`).

Each adapter is a LoRA run (`finetune.lora.rank`) fine-tuned from the served base: its base
weights must equal the base's (shapes, dtypes, values) and it must adapt the same weights
(ranks and alphas may differ). The engine runs with the base workdir's config.
Their ``a`` and ``b`` are stacked on a leading adapter axis, ranks zero-padded to the largest
(exact: a zero column of ``a`` meets a zero row of ``b``) and each adapter's scale
(alpha / rank) folded into its ``b``; adapter 0 is the base workdir's own adapter if it is a
LoRA run, else zeros (the base model itself). A request picks its adapter by `model`; the
engine's steps gather each batch row's adapter (`infra.models.lora.select_adapters`), so
requests of different adapters decode in one batch.

Each adapter's checkpoint is restored whole (base and adapter) to check its base, then only the
adapter is kept.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from infra import paths
from infra.errors import UserError
from infra.models import lora
from infra.serve.loading import load_model


def _equal(x: Any, y: Any) -> bool:
    same = jax.tree.structure(x) == jax.tree.structure(y)
    return same and all(a.shape == b.shape and a.dtype == b.dtype and bool(jnp.array_equal(a, b))
                        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def stack_params(base: dict, entries: list[tuple[dict, float] | None], mesh) -> dict:
    """`base` parameters with the adapters of `entries` ((adapter tree as `lora.split` gives
    it, scale), or None for none: zeros) stacked on a leading axis, ranks padded, scales
    folded into ``b``."""
    scaled = [None if e is None else {
        path: {"a": ab["a"], "b": ab["b"] * jnp.asarray(e[1], ab["b"].dtype)}
        for path, ab in lora.adapter_items(e[0])} for e in entries]
    first = next(e for e in scaled if e is not None)
    for i, e in enumerate(scaled):
        if e is not None and set(e) != set(first):
            raise UserError(f"adapter {i} adapts other weights than the others "
                            f"({sorted('/'.join(map(str, p)) for p in e)[:3]}...); serve "
                            "adapters of the same finetune.lora.targets together")
    rank = max(ab["a"].shape[-1] for e in scaled if e is not None for ab in e.values())

    def padded(x: jax.Array, axis: int) -> jax.Array:  # the rank axis zero-padded to `rank`
        return jnp.pad(x, [(0, rank - x.shape[axis] if i == axis else 0) for i in range(x.ndim)])

    tree: dict = {}
    for path, ref in first.items():
        # loop layout (the engine's): a (*in, rank), b (rank, *out)
        a = [padded(e[path]["a"] if e else jnp.zeros_like(ref["a"]), ref["a"].ndim - 1)
             for e in scaled]
        b = [padded(e[path]["b"] if e else jnp.zeros_like(ref["b"]), 0) for e in scaled]
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1] + lora.SUFFIX] = {
            k: jax.device_put(jnp.stack(x), NamedSharding(mesh, P(None, *ref[k].sharding.spec)))
            for k, x in (("a", a), ("b", b))}
    return lora.join(base, tree)


def stack(base_workdir: paths.PathLike, base_config, base_params: dict,
          named: dict[str, paths.PathLike], mesh) -> tuple[dict, Any, int]:
    """(parameters with every adapter stacked, a model definition that has the adapters, the
    number of stacked adapters): adapter 0 the base workdir's own (or zeros), then `named`'s
    in order. Each run is restored as the engine restores one (`loading.load_model`)."""
    base, own = lora.split(base_params)
    entries = [(own, lora.scale_of(base_config)) if own else None]
    model_def = None
    for name, workdir in named.items():
        config, definition, params, _, _ = load_model(workdir, mesh)
        if not lora.enabled(config):
            raise UserError(f"--adapter {name}={workdir}: not a LoRA run (finetune.lora.rank "
                            "is unset); serve a fully fine-tuned model with --workdir")
        their_base, adapters = lora.split(params)
        if not _equal(their_base, base):
            raise UserError(f"--adapter {name}={workdir}: its base weights differ from "
                            f"--workdir {base_workdir}'s; it was fine-tuned from another base")
        entries.append((adapters, lora.scale_of(config)))
        model_def = model_def or definition
    if model_def is None:
        raise UserError("--adapter names no adapter")
    return stack_params(base, entries, mesh), model_def, len(entries)
