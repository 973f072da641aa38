"""`hf export`: a run's checkpoint -> a Hugging Face model directory that
`AutoModelForCausalLM.from_pretrained` (and vLLM, llama.cpp converters, ...) loads.

Writes `config.json` (the architecture that computes what our model does: the imported source's
when it still fits, else Llama / Qwen2 / Qwen3 by the model's options), `generation_config.json`,
the weights as `model.safetensors` or `model-0000i-of-0000n.safetensors` + index above
`max_shard_size` (as `save_pretrained` does), and the tokenizer files of the run's
`data.tokenizer`. The parameters are read with `restore_params` (read-only) onto an FSDP mesh
over every device and gathered to the host one HF tensor at a time, so the host never holds
more than one tensor. The directory is written as `<out>.exporting` and renamed when complete.

A byte-level run has no Hugging Face tokenizer: its export holds the weights and config only
(token ids are UTF-8 bytes, PAD 256, BOS 257, EOS 258).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from infra.errors import UserError


def _mesh(config):
    from infra.generate import _mesh as generate_mesh

    return generate_mesh(config)


def _source_hf_config(workdir: Path, config) -> dict:
    """The transformers config the run's weights came from, if any (import or init.from)."""
    from infra.interop.importer import HF_CONFIG, is_hf_dir

    candidates = [workdir / HF_CONFIG]
    source = config.get("init", {}).get("from", "") if "init" in config else ""
    if source:
        from infra import paths

        source = paths.path(source)
        candidates += [source / "config.json"] if is_hf_dir(source) else [source / HF_CONFIG]
    for path in candidates:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def export_hf(workdir: str | Path, out: str | Path, *, step: int | None = None,
              dtype: str = "auto", max_shard_size: int = 5 * 10**9):
    """Export the newest intact checkpoint of `workdir` (or `step`) into the new directory `out`
    (either may be in a bucket: `out` is written locally, then uploaded)."""
    from infra import paths

    target = paths.path(out)
    if paths.is_remote(target) and target.exists() and any(target.iterdir()):
        raise UserError(f"--out {target} exists and is not an empty directory; pass a new one")
    with paths.staged(target) as local:
        written = _export(paths.path(workdir), local, step=step, dtype=dtype,
                          max_shard_size=max_shard_size)
    return target if paths.is_remote(target) else written


def _export(workdir, out: Path, *, step: int | None, dtype: str, max_shard_size: int) -> Path:
    """`export_hf` into the local directory `out`."""
    import jax
    from jax.experimental import multihost_utils

    from infra import paths, process
    from infra.checkpoint import restore_params
    from infra.data.tokenizer import copy_tokenizer_files, load_tokenizer
    from infra.generate import load_config
    from infra.interop.hf_config import architecture_for, to_hf
    from infra.interop.hf_weights import tensor_maps
    from infra.interop.importer import abstract_params
    from infra.interop.safetensors_io import NAMES, write_safetensors

    process.setup()
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory; pass a new one")
    config = load_config(workdir)
    if config.model.name != "transformer":
        raise UserError(f"export needs a transformer language model; {workdir} trains "
                        f"{config.model.name!r}")
    model = config.model.to_dict()
    source = _source_hf_config(workdir, config)
    architecture = architecture_for(model, (source.get("architectures") or [None])[0])
    storage = {"auto": config.model.param_dtype}.get(dtype, dtype)
    if storage not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    st_dtype = NAMES[np.dtype(jax.numpy.dtype(storage))]
    tok = load_tokenizer(config.data.tokenizer)
    from infra import mesh as mesh_lib

    mesh_lib.initialize_distributed(config.distributed)

    abstract = abstract_params(config, _mesh(config))
    params, step = restore_params(workdir, abstract, step=step)
    maps = tensor_maps(params, config.model.num_layers)
    leaves = dict(zip((m.path for m in maps), jax.tree.leaves(params)))
    entries, producers = [], {}
    for m in maps:
        if m.path == "unembedding" and config.model.tie_embeddings:
            continue
        for layer, name in enumerate(m.names):
            entries.append((name, st_dtype, m.hf_shape))
            producers[name] = (m, layer)

    def produce(name: str) -> np.ndarray:
        m, layer = producers[name]
        array = leaves[m.path]
        if m.stacked:
            array = array[layer]
        if not array.is_fully_addressable:
            array = multihost_utils.process_allgather(array, tiled=True)
        return m.to_hf(np.asarray(jax.device_get(array)))

    main = jax.process_index() == 0
    tmp = out.with_name(out.name + ".exporting")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        write_safetensors(tmp, entries, produce, max_shard_bytes=max_shard_size, write=main)
        if main:
            eos = tok.eos_id
            hf = to_hf(model, architecture=architecture, bos_token_id=tok.bos_id,
                       eos_token_id=source.get("eos_token_id", eos) if source else eos,
                       dtype=storage)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
            if tok.pad_id is not None:
                generation["pad_token_id"] = tok.pad_id
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            if config.data.tokenizer:
                copy_tokenizer_files(paths.localize(config.data.tokenizer), tmp)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
