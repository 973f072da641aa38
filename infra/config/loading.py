"""Loading an experiment's config: its file, the defaults it leaves out, command-line
overrides, a parallelism preset and an `init.from` source's architecture, then validation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ml_collections import ConfigDict

from infra import paths
from infra.config.base import complete, validate
from infra.config.experiments import call_get_config, import_experiment, resolve_experiment_path
from infra.config.overrides import apply_overrides, parse_override_args
from infra.config.saved import CONFIG_FILE, read_saved
from infra.config.sections import apply_preset
from infra.errors import ConfigError
from infra.interop.hf_config import ARCHITECTURE_KEYS, from_hf, is_hf_dir, read_hf_config

log = logging.getLogger(__name__)


def load(spec: str, overrides: Mapping[str, Any] | Iterable[str] | None = None) -> ConfigDict:
    """Load `experiments/lm.py:tiny`, apply overrides, validate, and return a locked config.

    `overrides` is a mapping of dotted keys to values (`{"optim.lr": 3e-4}`) or a list of
    command-line strings (`["--config.optim.lr=3e-4"]`); both are type-checked against the
    base config.
    """
    name, _, variant = spec.partition(":")
    path = resolve_experiment_path(name)
    module = import_experiment(path)
    variants = getattr(module, "VARIANTS", None)
    if variant and variants is not None and variant not in variants:
        raise ConfigError(
            f"unknown variant '{variant}' of {path.name}; known variants: {', '.join(variants)} "
            f"(e.g. --config {name}:{next(iter(variants), 'smoke')})"
        )
    config = call_get_config(module, variant or None, path)
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path.name}:get_config must return an ml_collections.ConfigDict")
    with config.unlocked():
        config.experiment = f"{name}:{variant}" if variant else name
    complete(config)
    overrides = overrides or {}
    if not isinstance(overrides, Mapping):
        overrides = parse_override_args(list(overrides))
    apply_overrides(config, overrides)
    apply_preset(config, explicit=set(overrides))
    apply_init_from(config)
    validate(config)
    config.lock()
    return config


def _init_source(source: str) -> tuple[dict[str, Any], str]:
    """(model.* values, tokenizer spec) of an `init.from` source."""
    path = paths.path(source)
    if is_hf_dir(path):
        model = from_hf(read_hf_config(path), str(path / "config.json"))
        return model, str(path) if (path / "tokenizer.json").is_file() else ""
    if (path / CONFIG_FILE).is_file():
        raw = read_saved(path)
        return dict(raw.get("model") or {}), (raw.get("data") or {}).get("tokenizer", "")
    raise ConfigError(f"init.from {source!r} is neither a workdir of ours nor a Hugging Face "
                      "model directory (no config.json)", key="init.from",
                      value="<workdir or HF model dir>")


def apply_init_from(config: ConfigDict) -> None:
    """Give the (unlocked) config the architecture (`ARCHITECTURE_KEYS`: shapes, vocabulary,
    RoPE, biases, norms, tying), the context (`max_seq_len`, where the source's is longer)
    and, when it has none of its own, the tokenizer of its
    `init.from` source; run choices stay the run's. Done at load, so the saved config, `plan`
    and the sharding table describe the model actually trained."""
    source = config.init["from"]
    if not source:
        return
    model, tokenizer = _init_source(source)
    if model.get("name", "transformer") != config.model.name:
        raise ConfigError(f"init.from {source!r} holds a {model.get('name')!r} model but the run "
                          f"trains {config.model.name!r}", key="init.from", value="''")
    if config.model.name == "transformer":
        changed = {k: model[k] for k in ARCHITECTURE_KEYS if k in model and config.model[k] != model[k]}
        # the model's context stays the source's (serving and export see it), unless the run
        # sets a longer one (training beyond it)
        if model.get("max_seq_len", 0) > config.model.max_seq_len:
            changed["max_seq_len"] = model["max_seq_len"]
        with config.model.unlocked():
            config.model.update(changed)
        if changed:
            log.info("init.from %s: model %s from the source", source,
                     ", ".join(f"{k}={v}" for k, v in changed.items()))
    if tokenizer and "tokenizer" in config.data and not config.data.tokenizer:
        config.data.tokenizer = tokenizer
