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

from infra.errors import ConfigError

log = logging.getLogger(__name__)


def source_of(config) -> str:
    return config.init["from"] if "init" in config else ""


def _source_model(source: str) -> tuple[dict[str, Any], str]:
    """(model.* values, tokenizer spec) of an `init.from` source."""
    from infra import config as config_lib
    from infra.interop.hf_config import from_hf
    from infra.interop.importer import is_hf_dir, read_hf_config

    path = Path(source).expanduser()
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
    params, step = restore_params(source, abstract_params)
    log.info("parameters from %s (step %d)", source, step)
    return params
