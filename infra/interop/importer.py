"""`hf import`: a Hugging Face model directory -> a workdir that `generate`, `eval`, `train` and
`hf export` use like any run's.

The workdir holds `config.json` (the resolved run config: the model's architecture from the HF
config, `data.tokenizer` pointing at the copied tokenizer), `tokenizer/` (the tokenizer files),
`hf_config.json` (the source's config, so export can name the same architecture) and a
**parameters-only step-0 checkpoint** (`checkpoints/0/{state,fingerprint,meta}`, meta
`params_only: true`): the same layout and checksums as a training checkpoint, without an
optimizer state that would triple its size. `restore_params` reads it like any checkpoint;
`train` in that workdir (or any run with `init.from=<workdir>`) starts from these parameters at
step 0 with a fresh optimizer.

Downloaded files are untrusted. Nothing is written unless everything is valid: the config, the
tokenizer (its chat template compiled in the template sandbox), every safetensors header (byte
ranges that tile the file exactly, shards that are regular files inside the model directory) and
every tensor's values (no NaN or Inf). The workdir is assembled in `<workdir>.importing`
(`infra.interop.staging`: locked, so two imports into one workdir cannot interleave) and renamed
at the end; a failed write (full disk, read-only) is one line and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from infra import config as config_lib
from infra import mesh as mesh_lib
from infra import paths, process
from infra.checkpoint import layout
from infra.checkpoint.verify import fingerprint
from infra.data import template_sandbox
from infra.data.text import VOCAB_SIZE as byte_vocab
from infra.data.tokenizer import HFTokenizer, copy_tokenizer_files
from infra.errors import UserError, output_error
from infra.interop import gguf_convert
from infra.interop.hf_config import ARCHITECTURE_KEYS, from_hf, read_hf_config
from infra.interop.hf_weights import run_maps
from infra.interop.safetensors_io import SafetensorsDir, check_finite, load_params
from infra.interop.staging import Staging
from infra.run import abstract_params

HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
log = logging.getLogger(__name__)


def check_new_dir(target: Path, flag: str, fix: str) -> None:
    """UserError unless `target` (a command's output directory) is absent or an empty
    directory."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target} is a file, not a directory; {fix}")
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{flag} {target} exists and is not empty; {fix}")


def check_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    """The checkpoint's tokenizer loads, fits the model's vocabulary, and its chat template (code
    that came with the download) compiles in the template sandbox."""
    tok = HFTokenizer(hf_dir)
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer in {hf_dir} has {tok.vocab_size} tokens but "
                        f"model.vocab_size is {vocab_size}; the checkpoint does not match its "
                        "tokenizer")
    if tok.chat_template:
        try:
            template_sandbox.shared().check(tok.chat_template)
        except UserError as e:
            raise UserError(f"{hf_dir}: {e.message.split('; fix')[0]}; fix or remove the "
                            "chat_template of its tokenizer_config.json (or chat_template.jinja) "
                            "and import again") from None


def check_architecture(config, model: dict[str, Any], source: str) -> None:
    """UserError naming the first architecture key where the run's config and the source differ."""
    for key in ARCHITECTURE_KEYS:
        if key in model and config.model[key] != model[key]:
            raise UserError(f"model.{key} is {config.model[key]!r} in the config but "
                            f"{model[key]!r} in {source}; use a config of the same model or "
                            f"drop --config", key=f"model.{key}", value=model[key])


def run_config(hf_dir: Path, model: dict[str, Any], *, spec: str | None,
               overrides: list[str] | dict | None, tokenizer: str, origin: str | None = None):
    """The locked run config of an import: the experiment `spec` (its model must match the
    checkpoint's) or the base LM config with the checkpoint's model (`experiment`:
    `hf:<origin>`, what the user imported, default `hf_dir`); then the overrides."""
    if spec:
        config = config_lib.load(spec, overrides)
        check_architecture(config, model, hf_dir / "config.json")
        config.unlock()
    else:
        config = config_lib.base_config("lm")
        config.experiment = f"hf:{origin or hf_dir}"
        with config.model.unlocked():
            config.model.update(model)
        config.data.seq_len = min(config.data.seq_len, model["max_seq_len"])
        config_lib.complete(config)
        if overrides:
            ov = overrides if isinstance(overrides, dict) else config_lib.parse_override_args(
                list(overrides))
            config_lib.apply_overrides(config, ov)
            config_lib.apply_preset(config, explicit=set(ov))
        check_architecture(config, model, hf_dir / "config.json")
    config.data.tokenizer = tokenizer
    config_lib.validate(config)
    config.lock()
    return config


def load_hf_params(hf_dir: str | Path, config, abstract: Any, on_tensor=None,
                   stats: dict | None = None) -> Any:
    """The checkpoint's parameters onto `abstract`'s shardings (streamed, see safetensors_io).
    `stats` (a dict) receives `bytes_read` (by this process) and `bytes_total` (the tensors')."""
    ckpt = SafetensorsDir(paths.localize(hf_dir))  # positioned reads need a local file
    maps = run_maps(abstract, config.model.to_dict())
    ckpt.check(maps, tied=config.model.tie_embeddings)
    params = load_params(ckpt, maps, abstract, on_tensor=on_tensor)
    check_finite(ckpt, maps, params)
    if stats is not None:
        stats.update(bytes_read=ckpt.bytes_read, bytes_total=ckpt.nbytes)
    return params


def write_params_checkpoint(workdir: Path, params: Any, meta: dict) -> None:
    """A parameters-only step-0 checkpoint in the run layout: `state` (`{"params": ...}`),
    `fingerprint/fingerprint.json` (a checksum per array, what `restore_params` verifies) and
    `meta/metadata` (JSON). Written with Orbax's stock handlers, so it does not depend on the
    training checkpointer's own ones."""
    import orbax.checkpoint as ocp

    state = {"params": params}
    manager = ocp.CheckpointManager(
        layout.checkpoints_dir(workdir),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_handlers={layout.STATE: ocp.StandardCheckpointHandler(),
                       layout.FINGERPRINT: ocp.JsonCheckpointHandler(filename="fingerprint.json"),
                       layout.META: ocp.JsonCheckpointHandler()})
    manager.save(0, args=ocp.args.Composite(**{
        layout.STATE: ocp.args.StandardSave(state),
        layout.FINGERPRINT: ocp.args.JsonSave(fingerprint(state)),
        layout.META: ocp.args.JsonSave({"step": 0, "params_only": True, **meta}),
    }), force=True)
    manager.wait_until_finished()
    manager.close()  # not after a failed write: that would tear down Orbax's event loop
    # under the writes still failing (the caller reports the failure in one line)


def import_hf(hf_dir: str | Path, workdir: str | Path, *, spec: str | None = None,
              overrides: list[str] | dict | None = None, stats: dict | None = None):
    """Import `hf_dir` into a new `workdir` (see the module docstring). Returns the workdir;
    `stats` (a dict) receives what this process read (`load_hf_params`). Either may be in a
    bucket: the model is read from a local copy, and the workdir written locally, then uploaded
    (one process)."""
    target = paths.path(workdir)
    check_new_dir(target, "--workdir", "import into a new --workdir")
    source = paths.localize(hf_dir)
    origin = str(hf_dir) if paths.is_remote(hf_dir) else str(Path(hf_dir).expanduser().resolve())
    with contextlib.ExitStack() as stack:
        if gguf_convert.is_gguf(source):  # a llama.cpp file: as the HF directory it stands for
            converted = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="infra-gguf-", dir=_scratch_dir(target)))) / Path(source).stem
            source = gguf_convert.convert(source, converted)
        local = stack.enter_context(paths.staged(target))
        _import(source, local, recorded=target, origin=origin, spec=spec, overrides=overrides,
                stats=stats)
    return target if paths.is_remote(target) else local


def _scratch_dir(target) -> str | None:
    """Where a GGUF file is converted: beside a local workdir (the same disk), else the
    system's temporary directory."""
    if paths.is_remote(target):
        return None
    parent = Path(target).expanduser().resolve().parent
    return str(parent) if parent.is_dir() else None


def _import(hf_dir: Path, workdir: Path, *, recorded, origin: str, spec: str | None,
            overrides: list[str] | dict | None, stats: dict | None) -> Path:
    """`import_hf` of `hf_dir` (a local copy or conversion of `origin`, what the user named)
    into a local `workdir` that the saved config calls `recorded`."""
    import jax

    process.setup()
    hf_dir, workdir = Path(hf_dir).expanduser().resolve(), Path(workdir).expanduser().resolve()
    if not paths.is_remote(recorded):
        recorded = workdir
    hf = read_hf_config(hf_dir)
    model = from_hf(hf, str(hf_dir / "config.json"))
    has_tokenizer = (hf_dir / "tokenizer.json").is_file()
    tok_dir = recorded / TOKENIZER_DIR
    config = run_config(hf_dir, model, spec=spec, overrides=overrides,
                        tokenizer=str(hf_dir) if has_tokenizer else "", origin=origin)
    if has_tokenizer:
        check_tokenizer(hf_dir, config.model.vocab_size)
    elif config.model.vocab_size > byte_vocab:
        log.warning("warning: %s has no tokenizer.json, so this import tokenizes as UTF-8 bytes "
                    "(ids 0-%d) although the model has %d tokens: its text will be garbage; put "
                    "the model's tokenizer.json and tokenizer_config.json in %s and import again",
                    hf_dir, byte_vocab - 1, config.model.vocab_size, hf_dir)
    mesh_lib.initialize_distributed(config.distributed)  # a multi-process import
    abstract = abstract_params(config)
    saved = config.to_dict()  # with the workdir's own copy of the tokenizer
    saved["data"]["tokenizer"] = str(tok_dir) if has_tokenizer else ""
    main = jax.process_index() == 0
    with Staging(workdir, ".importing", flag="--workdir", command="hf import",
                 main=main) as staging:  # a second import into the same workdir stops here
        _barrier("infra_import_start")
        # every header checked, then every tensor read, placed and checked finite
        params = load_hf_params(hf_dir, config, abstract, stats=stats)
        try:
            write_params_checkpoint(staging.path, params, {
                "config": saved, "experiment": config.experiment, "source": origin})
            if main:
                _write_run_files(staging.path, hf_dir, hf, saved, has_tokenizer)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed write: one line, nothing left behind
            raise output_error(workdir, e, "--workdir", " (nothing was imported)") from None
        _barrier("infra_import_written")
        staging.commit()
    _barrier("infra_import_done")
    return workdir


def _write_run_files(directory: Path, hf_dir: Path, hf: dict, saved: dict,
                     has_tokenizer: bool) -> None:
    """The run's config.json, the source's HF config, and a copy of its tokenizer files."""
    config_lib.save(ConfigDict(saved), directory)
    (directory / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    if has_tokenizer:
        copy_tokenizer_files(hf_dir, directory / TOKENIZER_DIR)
        for extra in ("generation_config.json",):
            if (hf_dir / extra).is_file():
                shutil.copyfile(hf_dir / extra, directory / TOKENIZER_DIR / extra)


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
