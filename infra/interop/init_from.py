"""`init.from`: start a run from another model's parameters (fresh optimizer, step 0).

`init.from` names a workdir of ours (any run, or an `hf import`) or a Hugging Face model
directory. The run takes the source's *architecture* (`ARCHITECTURE_KEYS`: shapes, vocabulary,
RoPE, biases, norms, tying) and, when it has none of its own, its tokenizer (`data.tokenizer`);
run choices stay the run's (sequence length, dtypes, remat, scan_layers, mesh). This is applied
when the config is loaded (`infra.config.load`), so the saved `config.json`, `plan` and the
sharding table all describe the model actually trained. The parameters are loaded when the run
starts without a checkpoint of its own, straight onto the run's mesh: a workdir through
`restore_params`, an HF directory by streaming its safetensors (`safetensors_io`).

A workdir whose newest checkpoint is parameters-only (what `hf import` writes) starts the same
way when trained in directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from infra.errors import ConfigError

log = logging.getLogger(__name__)


def source_of(config) -> str:
    return config.init["from"] if "init" in config else ""


def _source_model(source: str) -> tuple[dict[str, Any], str]:
    """(model.* values, tokenizer spec) of an `init.from` source."""
    from infra import config as config_lib
    from infra.interop.hf_config import from_hf
    from infra.interop.importer import is_hf_dir, read_hf_config

    from infra import paths

    path = paths.path(source)
    if is_hf_dir(path):
        model = from_hf(read_hf_config(path), str(path / "config.json"))
        return model, str(path) if (path / "tokenizer.json").is_file() else ""
    if (path / config_lib.CONFIG_FILE).is_file():
        raw = config_lib.read_saved(path)
        return dict(raw.get("model") or {}), (raw.get("data") or {}).get("tokenizer", "")
    raise ConfigError(f"init.from {source!r} is neither a workdir of ours nor a Hugging Face "
                      "model directory (no config.json)", key="init.from",
                      value="<workdir or HF model dir>")


def apply_source_architecture(config) -> None:
    """Give the (unlocked) config the architecture and tokenizer of its `init.from` source."""
    source = source_of(config)
    if not source:
        return
    from infra.interop.hf_config import ARCHITECTURE_KEYS

    model, tokenizer = _source_model(source)
    if model.get("name", "transformer") != config.model.name:
        raise ConfigError(f"init.from {source!r} holds a {model.get('name')!r} model but the run "
                          f"trains {config.model.name!r}", key="init.from", value="''")
    if config.model.name == "transformer":
        changed = {k: model[k] for k in ARCHITECTURE_KEYS if k in model and config.model[k] != model[k]}
        with config.model.unlocked():
            config.model.update(changed)
        if changed:
            log.info("init.from %s: model %s from the source", source,
                     ", ".join(f"{k}={v}" for k, v in changed.items()))
    if tokenizer and "tokenizer" in config.data and not config.data.tokenizer:
        config.data.tokenizer = tokenizer


def params_only_checkpoint(workdir: str | Path) -> bool:
    """The newest committed checkpoint in `workdir` holds parameters only (an import)."""
    from infra.checkpoint import layout

    steps = layout.committed_steps(workdir)
    if not steps:
        return False
    try:
        return bool(layout.read_meta(layout.step_dir(workdir, steps[-1])).get("params_only"))
    except (OSError, ValueError):
        return False


def load_params(source: str | Path, config, abstract_params: Any) -> Any:
    """The source's parameters onto `abstract_params`' shardings (the run's own mesh)."""
    from infra.checkpoint import restore_params
    from infra.interop.importer import is_hf_dir, load_hf_params

    if is_hf_dir(source):
        return load_hf_params(source, config, abstract_params)
    from infra import config as config_lib

    source_scan = bool(config_lib.read_saved(source).get("model", {}).get("scan_layers", False))
    if config.model.name != "transformer" or source_scan == config.model.scan_layers:
        params, step = restore_params(source, abstract_params)
    else:  # restore in the source's layer layout, then stack / unstack onto the run's
        from infra.interop.importer import abstract_params as abstract_of

        other = config_lib.ConfigDict(config.to_dict())
        other.model.scan_layers = source_scan
        mesh = jax.tree.leaves(abstract_params)[0].sharding.mesh
        params, step = restore_params(source, abstract_of(other, mesh))
        params = convert_layers(params, config.model.num_layers, abstract_params)
    log.info("parameters from %s (step %d)", source, step)
    return params


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
