"""`init.from`: start a run from another model's parameters (fresh optimizer, step 0).

`init.from` names a workdir of ours (any run, or an `hf import`) or a Hugging Face model
directory. The run takes the source's *architecture* (`ARCHITECTURE_KEYS`: shapes, vocabulary,
RoPE, biases, norms, tying) and, when it has none of its own, its tokenizer (`data.tokenizer`);
run choices stay the run's (training sequence length, dtypes, remat, scan_layers, mesh; the
context `max_seq_len` is the longer of the two). That is applied
when the config is loaded (`infra.config.apply_init_from`), so the saved `config.json`, `plan`
and the sharding table all describe the model actually trained. The parameters are loaded here
when the run starts without a checkpoint of its own, straight onto the run's mesh: a workdir
through `infra.run.load_params` (any layer layout), an HF directory by streaming its
safetensors (`safetensors_io`).

A workdir whose newest checkpoint is parameters-only (what `hf import` writes) starts the same
way when trained in directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from infra import run
from infra.checkpoint import layout
from infra.config.sections import InitConfig
from infra.interop.hf_config import is_hf_dir
from infra.interop.importer import load_hf_params

log = logging.getLogger(__name__)


def source_of(config) -> str:
    """The run's `init.from`: a workdir or HF directory to start from ("" = none)."""
    return InitConfig.from_config(config.init).from_


def params_only_checkpoint(workdir: str | Path) -> bool:
    """The newest committed checkpoint in `workdir` holds parameters only (an import)."""
    steps = layout.committed_steps(workdir)
    if not steps:
        return False
    try:
        return bool(layout.read_meta(layout.step_dir(workdir, steps[-1])).get("params_only"))
    except (OSError, ValueError):
        return False


def load_params(source: str | Path, config, abstract_params: Any) -> Any:
    """The source's parameters onto `abstract_params`' shardings (the run's own mesh)."""
    if is_hf_dir(source):
        return load_hf_params(source, config, abstract_params)
    params, step = run.load_params(source, config, abstract_params)
    log.info("parameters from %s (step %d)", source, step)
    return params
