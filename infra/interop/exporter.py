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

A LoRA run (`finetune.lora.rank`) exports either way, and refuses to guess:

* `merge_lora=True`: every adapter folded into its weight, `W + (alpha / rank) * a b`
  (float32, on the devices, sharded like the weight), written as a plain model;
* `peft=True`: the adapters only, in PEFT's format: `adapter_config.json` (`r`, `lora_alpha`,
  `target_modules` in HF names such as `q_proj`, `base_model_name_or_path` = the `init.from`
  source) and `adapter_model.safetensors` with PEFT's names
  (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `(r, in_features)`;
  `lora_B`: `(out_features, r)`), which `peft.PeftModel.from_pretrained(base, out)` loads.

An SFT run whose tokenizer has no chat template gets the one it was trained with (the built-in
template of `infra.data.chat`, or `data.chat_template`) in the exported `tokenizer_config.json`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from infra import mesh as mesh_lib
from infra import paths, process
from infra.checkpoint import restore_params
from infra.data.chat import run_template
from infra.data.tokenizer import copy_tokenizer_files, load_tokenizer
from infra.errors import UserError, output_error
from infra.interop.hf_config import architecture_for, is_hf_dir, to_hf
from infra.interop.hf_weights import BLOCK_NAMES, run_maps
from infra.interop.importer import HF_CONFIG, check_new_dir
from infra.interop.safetensors_io import DTYPES, NAMES, SINGLE
from infra.interop.safetensors_write import write_safetensors
from infra.interop.staging import Staging
from infra.models import lora
from infra.run import abstract_params, load_config
from infra.tasks import CHAT_TASKS


def _source_hf_config(workdir: Path, config) -> dict:
    """The transformers config the run's weights came from, if any (import or init.from)."""
    candidates = [workdir / HF_CONFIG]
    source = config.init["from"]
    if source:
        source = paths.path(source)
        candidates += [source / "config.json"] if is_hf_dir(source) else [source / HF_CONFIG]
    for path in candidates:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def _within(inner, outer) -> bool:
    """`inner` is `outer` or lies below it (local paths compared resolved, so `a/../a` and
    symlinks count)."""
    def full(p) -> str:
        return str(p) if paths.is_remote(p) else str(Path(p).expanduser().resolve())

    a, b = full(inner), full(outer).rstrip("/")
    return a == b or a.startswith(b + "/")


def export_hf(workdir: str | Path, out: str | Path, *, step: int | None = None,
              dtype: str = "auto", max_shard_size: int = 5 * 10**9, merge_lora: bool = False,
              peft: bool = False):
    """Export the newest intact checkpoint of `workdir` (or `step`) into the new directory `out`
    (LoRA runs: `merge_lora` or `peft`, see the module docstring). Either may be in a bucket:
    `out` is written locally, then uploaded."""
    target, source = paths.path(out), paths.path(workdir)
    if _within(target, source):
        raise UserError(f"--out {target} is inside the run's workdir {source}; export to a "
                        "directory outside it (the run's own files, checkpoints included, "
                        "must not mix with the export)")
    check_new_dir(target, "--out", "pass a new directory")
    if max_shard_size <= 0:
        raise UserError(f"--max_shard_size must be positive, got {max_shard_size} bytes; write "
                        "e.g. 5GB or 500MB")
    with paths.staged(target) as local:
        written = _export(paths.path(workdir), local, step=step, dtype=dtype,
                          max_shard_size=max_shard_size, merge_lora=merge_lora, peft=peft)
    return target if paths.is_remote(target) else written


def _export(workdir, out: Path, *, step: int | None, dtype: str, max_shard_size: int,
            merge_lora: bool, peft: bool) -> Path:
    """`export_hf` into the local directory `out`."""
    import jax

    process.setup()
    out = Path(out).expanduser().resolve()
    config = load_config(workdir, command="hf export")
    _check_export(config, workdir, merge_lora=merge_lora, peft=peft)
    storage = {"auto": config.model.param_dtype}.get(dtype, dtype)
    if storage not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    st_dtype = NAMES[np.dtype(jax.numpy.dtype(storage))]
    tok = load_tokenizer(config.data.tokenizer)
    hf = _hf_config(config, tok, storage, workdir)  # refuses what transformers cannot load
    mesh_lib.initialize_distributed(config.distributed)
    abstract = abstract_params(config, mesh_lib.fsdp_mesh(config))
    params, step = restore_params(workdir, abstract, step=step)
    if peft:
        return _export_peft(params, config, out, st_dtype, tok, workdir)
    if merge_lora:
        base_abstract, _ = lora.split(abstract)
        shardings = jax.tree.map(lambda a: a.sharding, base_abstract)
        params = jax.jit(lambda p: lora.merged(p, lora.scale_of(config)),
                         out_shardings=shardings)(params)
    entries, produce = _hf_tensors(params, config, st_dtype)
    main = jax.process_index() == 0
    with Staging(out, ".exporting", flag="--out", command="hf export", main=main) as staging:
        with _write_errors(out):
            write_safetensors(staging.path, entries, produce, max_shard_bytes=max_shard_size,
                              write=main)
            if main:
                _write_configs(staging.path, hf, config, tok)
        staging.commit()
    return out


def _check_export(config, workdir, *, merge_lora: bool, peft: bool) -> None:
    """A transformer LM run; LoRA runs say how their adapters are exported, others do not."""
    if config.model.name != "transformer":
        raise UserError(f"hf export needs a transformer language-model run; {workdir} trains "
                        f"{config.model.name!r}")
    if merge_lora and peft:
        raise UserError("pass one of --merge_lora (a whole model) and --peft (the adapters)")
    if lora.enabled(config) and not (merge_lora or peft):
        raise UserError(f"{workdir} trained LoRA adapters; pass --merge_lora (the weights with "
                        f"the adapters folded in) or --peft (the adapters, PEFT format)")
    if (merge_lora or peft) and not lora.enabled(config):
        raise UserError(f"{workdir} has no LoRA adapters (finetune.lora.rank is unset); export "
                        f"it without --merge_lora / --peft")


def _hf_tensors(params, config, st_dtype: str) -> tuple[list, Callable[[str], np.ndarray]]:
    """(safetensors entries (name, dtype, shape), name -> the tensor in HF layout, gathered
    to the host one at a time)."""
    import jax
    from jax.experimental import multihost_utils

    maps = run_maps(params, config.model.to_dict())
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
        if m.stacked:  # `layer`: the flat index over the stacked dims (layers, experts)
            array = array[np.unravel_index(layer, m.stack)]
        if not array.is_fully_addressable:
            array = multihost_utils.process_allgather(array, tiled=True)
        return m.to_hf(np.asarray(jax.device_get(array)))

    return entries, produce


def _hf_config(config, tok, storage: str, workdir) -> dict:
    """The transformers config.json of the export."""
    model = config.model.to_dict()
    source = _source_hf_config(workdir, config)
    architecture = architecture_for(model, (source.get("architectures") or [None])[0])
    eos = tok.eos_id
    return to_hf(model, architecture=architecture, bos_token_id=tok.bos_id,
                 eos_token_id=source.get("eos_token_id", eos) if source else eos, dtype=storage)


def _write_configs(directory: Path, hf: dict, config, tok) -> None:
    """config.json, generation_config.json and the tokenizer files (with the run's template)."""
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    if tok.pad_id is not None:
        generation["pad_token_id"] = tok.pad_id
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if config.data.tokenizer:
        copy_tokenizer_files(paths.localize(config.data.tokenizer), directory)
        _add_chat_template(config, tok, directory)


@contextlib.contextmanager
def _write_errors(out: Path):
    """A failed write of the export (full disk: exit 3; read-only: exit 2) as one line naming
    --out; `Staging` removes what was written."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
        raise output_error(out, e, "--out", " (nothing was exported)") from None


def _add_chat_template(config, tok, directory: Path) -> None:
    """An SFT run's chat template in the exported tokenizer_config.json, if the tokenizer has
    none of its own (or the run overrode it with data.chat_template)."""
    if config.task not in CHAT_TASKS:
        return

    if not config.data.chat_template and tok.chat_template:
        return  # the tokenizer files copied already carry it
    template = run_template(config, tok)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def peft_modules(config, params) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(HF module name, a, b) of every adapter in our layout, one entry per layer (host
    arrays: small), in layer order."""
    import jax
    from jax.experimental import multihost_utils

    def host(x):
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    out = []
    for path, ab in lora.adapter_items(lora.split(params)[1]):
        if path[0] != "blocks":
            raise UserError(f"no PEFT name for the adapter of {'/'.join(map(str, path))}")
        a, b = host(ab["a"]), host(ab["b"])
        if isinstance(path[1], int) or str(path[1]).isdigit():
            layers, inner = [(int(path[1]), a, b)], "/".join(map(str, path[2:]))
        else:
            layers, inner = [(i, a[i], b[i]) for i in range(a.shape[0])], "/".join(map(str, path[1:]))
        module = BLOCK_NAMES[inner].removesuffix(".weight")
        out += [(f"model.layers.{i}.{module}", x, y) for i, x, y in layers]
    return sorted(out, key=lambda m: (int(m[0].split(".")[2]), m[0]))


def _export_peft(params, config, out: Path, st_dtype: str, tok, workdir: Path) -> Path:
    """The adapters as a PEFT LoRA adapter directory."""
    import jax

    modules = peft_modules(config, params)
    tensors = {}
    for name, a, b in modules:
        rank = a.shape[-1]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.reshape(-1, rank).T
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.reshape(rank, -1).T
    by_layer: dict[int, set[str]] = {}
    for name, _, _ in modules:
        by_layer.setdefault(int(name.split(".")[2]), set()).add(name.rsplit(".", 1)[1])
    kinds = sorted(set().union(*by_layer.values()))
    uniform = all(v == set(kinds) for v in by_layer.values())
    if uniform and len(by_layer) == config.model.num_layers:
        targets, layers = kinds, None
    elif uniform:
        targets, layers = kinds, sorted(by_layer)
    else:  # any other selection: PEFT's regex form, matched against whole module names
        targets = "(" + "|".join(name.replace(".", r"\.") for name, _, _ in modules) + ")"
        layers = None
    lc = config.finetune.lora
    source = config.init["from"]
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lc.rank),
        "lora_alpha": float(lc.alpha), "target_modules": targets, "layers_to_transform": layers,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": str(Path(source).expanduser().resolve()) if source else None,
    }
    if source and not is_hf_dir(source):
        adapter_config["base_model_name_or_path"] = None  # export the base with `hf export`
    if jax.process_index() != 0:
        return out
    with Staging(out, ".exporting", flag="--out", command="hf export") as staging:
        tmp = staging.path
        with _write_errors(out):
            entries = [(n, st_dtype, t.shape) for n, t in tensors.items()]
            write_safetensors(tmp, entries, lambda n: tensors[n].astype(DTYPES[st_dtype]),
                              max_shard_bytes=1 << 62)
            (tmp / SINGLE).rename(tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
            if config.data.tokenizer:
                copy_tokenizer_files(config.data.tokenizer, tmp)
                _add_chat_template(config, tok, tmp)
        staging.commit()
    return out
