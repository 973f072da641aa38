"""What a serving engine loads: a run's model in the loop layer layout on the serving mesh, and
which token ids it may draw. Shared by `infra.serve.engine`, `infra.serve.adapters` (each
adapter's run) and `generate`."""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from infra import paths, run


def load_model(workdir: paths.PathLike, mesh: Mesh, *, step: int | None = None):
    """(config, ModelDef, params, step, rules) of the newest intact checkpoint in `workdir` on
    `mesh`, in the loop layer layout (compute path of `forward`); experts without a capacity
    (dropless), so that what a request gets does not depend on what runs beside it."""
    workdir = paths.path(workdir)
    config = run.load_config(workdir)
    run.require_checkpoint(workdir)
    serving = serving_config(config)
    sharded, rules = run.sharded_model(serving, mesh)
    params, step = run.load_params(workdir, serving, sharded.abstract["params"], step=step)
    return serving, sharded.model, params, step, rules


def serving_config(config) -> ConfigDict:
    """`config` as served: layers unrolled (the loop layout), no rematerialisation, experts
    without a capacity (dropless), so that what a request gets does not depend on what runs
    beside it."""
    serving = ConfigDict(config.to_dict())
    serving.model.scan_layers = False
    serving.model.remat = "none"
    if "capacity_factor" in serving.model:
        serving.model.capacity_factor = 0.0
    return serving


def allowed_ids(tok, vocab_size: int) -> np.ndarray:
    """Ids that may be sampled: the tokenizer's, less PAD (unless PAD is EOS). Other special
    tokens are text the model may produce (a chat model's `<|im_start|>`)."""
    allowed = np.arange(vocab_size) < tok.vocab_size
    if tok.pad_id is not None and tok.pad_id != tok.eos_id:
        allowed[tok.pad_id] = False
    return allowed
