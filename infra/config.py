"""Experiment configs: the base defaults, loading `experiments/<name>.py:<variant>`, typed overrides.

An experiment file defines `get_config(arg: str | None) -> ConfigDict`, usually by calling
`base_config()` and changing what it needs, and a `VARIANTS` dict (variant name -> one-line
description) that `python -m infra list` prints. Experiment files are Python: loading one runs it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from infra.errors import ConfigError, UserError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"

# Logical axis -> mesh axes. Batch is split over every data-parallel axis and `length` over
# `sequence` (sequence parallelism, a no-op while that axis has size 1); weights are split over
# `fsdp` along `embed` and over `tensor` along heads / mlp / vocab (Megatron style). `act_*` names
# are activation dimensions (the model pins them with `infra.sharding.constrain`). Names that only
# one task's models use (image patches, embedding-table rows, forecast windows) are that task's
# `logical_rules`, appended after these (`infra.tasks.logical_rules`).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# The size of the model `base_config` trains when an experiment sets none (`lm.py:tiny`); the
# transformer's other hyper-parameters default in `infra.models.transformer.TransformerConfig`.
DEFAULT_MODEL = dict(
    vocab_size=384,  # 259 byte-level ids padded to a multiple of 128
    d_model=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=768,
    max_seq_len=256,
)

# Named parallelism layouts: mesh sizes (-1 = the remaining devices) on top of DEFAULT_RULES.
# `--config.sharding.preset=fsdp_tp`; an explicit `--config.mesh.<axis>=N` still wins.
PRESETS = {
    "dp": dict(data=-1, fsdp=1, sequence=1, tensor=1),
    "fsdp": dict(data=1, fsdp=-1, sequence=1, tensor=1),
    "tp": dict(data=1, fsdp=1, sequence=1, tensor=-1),
    "dp_fsdp": dict(data=2, fsdp=-1, sequence=1, tensor=1),
    "fsdp_tp": dict(data=1, fsdp=-1, sequence=1, tensor=2),
    "dp_fsdp_tp": dict(data=2, fsdp=-1, sequence=1, tensor=2),
    "dp_sp": dict(data=-1, fsdp=1, sequence=2, tensor=1),
    "fsdp_sp": dict(data=1, fsdp=-1, sequence=2, tensor=1),
    "fsdp_tp_sp": dict(data=1, fsdp=-1, sequence=2, tensor=2),
}


def base_config(task: str = "lm") -> ConfigDict:
    """Every key the stack reads, with its default. Experiments override a subset.

    `model.*` defaults come from the model's typed hyper-parameters (`infra.models`), `data.*`
    from the task (`Task.data_defaults`); the rest are the loop's and live here.
    """
    from infra.models import model_config
    from infra.tasks import get_task_class

    c = ConfigDict()
    c.experiment = ""  # filled in by `load`: the spec the config came from
    c.task = task
    c.model = model_config("transformer", **DEFAULT_MODEL)
    c.data = ConfigDict(dict(get_task_class(task).data_defaults))

    c.train = ConfigDict(
        dict(
            steps=1000,
            batch_size=32,
            microbatches=1,  # gradient accumulation: the batch is split into this many
            seed=0,
            eval_every=200,
            log_every=20,
            stop_at=0,  # stop (with a checkpoint) at this step, schedule unchanged; 0 = steps
            eval_at_start=True,
            nonfinite="stop",  # NaN/Inf loss or gradients: "stop" (exit 4) or "skip" the update
            progress_bar=True,
            # after SIGTERM the run checkpoints and stops; if it has not within this many
            # seconds (stuck in a hung write, say) it exits anyway (code 143)
            sigterm_grace_s=120.0,
        )
    )

    c.optim = ConfigDict(
        dict(
            lr=1e-3,
            warmup_steps=100,
            min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio at train.steps
            weight_decay=0.1,
            grad_clip=1.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
        )
    )

    c.mesh = ConfigDict(
        dict(
            data=-1, fsdp=1, sequence=1, tensor=1,  # within a slice / host (ICI)
            dcn_data=1, dcn_fsdp=1, dcn_sequence=1, dcn_tensor=1,  # across slices (DCN)
        )
    )

    c.distributed = ConfigDict(
        dict(
            # "auto": initialise when the environment shows several processes (TPU pod, Slurm,
            # explicit coordinator); "always" / "never" force it.
            initialize="auto",
            coordinator_address="",
            num_processes=0,
            process_id=-1,
            # a process that stops answering is declared dead after this long; the others exit
            heartbeat_timeout_s=30,
        )
    )

    c.sharding = ConfigDict(
        dict(
            preset="",  # one of PRESETS; sets mesh.* sizes
            rules=DEFAULT_RULES,
            warn_replicated_mb=16.0,  # warn about replicated params larger than this
            print_table=True,
        )
    )

    # Start from another model's parameters (fresh optimizer, step 0): a workdir of ours or a
    # Hugging Face model directory; the run then takes its architecture and tokenizer
    # (`apply_init_from` below; the parameters: infra/interop/init_from.py).
    c.init = ConfigDict({"from": ""})

    # LoRA (infra/models/lora.py; transformer LM tasks): with `rank` set, every weight whose
    # path matches the regex `targets` gets low-rank adapters a, b (b = 0 at the start) and
    # only they train; the model computes W x + (alpha / rank) * b(a x). Unset: every
    # parameter trains (full fine-tuning).
    c.finetune = ConfigDict(dict(
        lora=ConfigDict(dict(rank=None, alpha=16.0, targets="attn/(q|k|v|o)")),
    ))

    c.profile = ConfigDict(
        dict(steps=())  # (first, last): capture a jax.profiler trace of these steps (TensorBoard)
    )

    c.checkpoint = ConfigDict(
        dict(
            every=500,  # steps between saves
            every_seconds=0.0,  # also save when this much time has passed (0 = off)
            keep=3,
            async_save=True,
            # async saves copy the state on its devices and return (one more state of device
            # memory while Orbax reads the copy in the background); false: save() waits for
            # Orbax's device-to-host transfer instead
            device_copy=True,
            fallback=True,  # a corrupted latest checkpoint: warn and use the previous one
            # gs:// workdirs: a failed request is retried this often (backoff 1 s -> 32 s, about
            # 15 minutes in all by default) before the save fails with exit 3
            storage_retries=32,
        )
    )
    return c


# --------------------------------------------------------------------------- loading


def resolve_experiment_path(name: str) -> Path:
    """`experiments/lm.py`, `lm.py` or `lm` -> an existing file (cwd first, then the project)."""
    candidates = [Path(name)]
    bare = Path(name).name
    if not bare.endswith(".py"):
        bare += ".py"
        candidates.append(Path(name + ".py"))
    candidates.append(EXPERIMENTS_DIR / bare)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    known = ", ".join(p.stem for p in list_experiment_files()) or "none"
    raise ConfigError(
        f"unknown experiment '{name}': no such file; known experiments in "
        f"{EXPERIMENTS_DIR}: {known}; pass --config experiments/<name>.py[:variant]"
    )


def import_experiment(path: Path):
    """Import an experiment file as a module (it is Python: this runs its code)."""
    module_name = f"infra_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the experiment's own code: report where it failed
        del sys.modules[module_name]
        raise ConfigError(f"experiment {path} failed to load: {_where(e, path)}; fix the "
                          f"experiment file") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment {path} has no get_config(arg) function; add one")
    return module


def _where(e: BaseException, path: Path) -> str:
    """`SyntaxError at line 3: invalid syntax` for an exception raised by the file at `path`."""
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
    if line is None:
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else None
    message = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().splitlines()
    at = f" at line {line}" if line else ""
    return f"{type(e).__name__}{at}: {message[0][:200] if message else ''}"


def _call_get_config(module, variant: str | None, path: Path) -> ConfigDict:
    try:
        return module.get_config(variant)
    except Exception as e:  # noqa: BLE001 - the experiment's own code
        raise ConfigError(f"{path.name}:get_config({variant!r}) failed: {_where(e, path)}; fix "
                          f"the experiment file") from None


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
    config = _call_get_config(module, variant or None, path)
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
    from infra import paths
    from infra.interop.hf_config import from_hf, is_hf_dir, read_hf_config

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
    RoPE, biases, norms, tying) and, when it has none of its own, the tokenizer of its
    `init.from` source; run choices stay the run's. Done at load, so the saved config, `plan`
    and the sharding table describe the model actually trained."""
    source = config.init["from"] if "init" in config else ""  # an experiment may build its own
    if not source:
        return
    from infra.interop.hf_config import ARCHITECTURE_KEYS

    model, tokenizer = _init_source(source)
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


def complete(config: ConfigDict) -> None:
    """Add the defaults of the config's model (`model.*`) and task (`data.*`) for every key the
    experiment left out, so each option the model and task read can be overridden by name."""
    from infra.models import complete_model_config
    from infra.tasks import get_task_class

    complete_model_config(config.model)
    with config.data.unlocked():
        for key, value in get_task_class(config.task).data_defaults.items():
            if key not in config.data:
                config.data[key] = value


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`["--config.a.b=1", "--config.c", "x"]` -> `{"a.b": "1", "c": "x"}` (values as text)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(
                f"unrecognised argument '{arg}'; overrides look like --config.optim.lr=3e-4"
            )
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --config.{key} has no value; write --config.{key}=VALUE")
            i += 1
            value = args[i]
        out[key] = value
        i += 1
    return out


def flatten_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key, dotted."""
    keys = []
    for k, v in config.items():
        if isinstance(v, ConfigDict):
            keys += flatten_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _unknown_key(key: str, config: ConfigDict) -> ConfigError:
    keys = flatten_keys(config)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # fall back to a match on the last component (`lr` -> `optim.lr`)
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m infra list` and the experiment file"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _example(key: str, current: Any) -> dict:
    """The current value as the fix's example (`e.g. train.steps=1000`), as it is typed."""
    if isinstance(current, bool):
        return dict(key=key, value=str(current).lower(), verb="e.g.")
    if isinstance(current, (int, float)):
        return dict(key=key, value=current, verb="e.g.")
    return {}


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Convert `value` (text from the command line, or a Python value) to the type of `current`."""
    want = type(current)
    if isinstance(value, str) and want is float and value.strip().lower().lstrip("+-") in (
        "nan", "inf", "infinity"
    ):
        return float(value)  # not a Python literal; `validate` says which range the key needs
    if isinstance(value, str) and want is not str:
        if want is bool:
            low = value.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ConfigError(f"config key '{key}' expects a bool (true/false), got '{value}'",
                              **_example(key, current))
        try:
            value = ast.literal_eval(value)  # literals only: never runs code
        except (ValueError, SyntaxError):
            if current is None:
                return value
            raise ConfigError(f"config key '{key}' expects {want.__name__}, got '{value}'",
                              **_example(key, current)) from None
    if current is None or value is None:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want in (tuple, list) and isinstance(value, (tuple, list)):
        return want(value)
    if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
        shown = value if not isinstance(value, str) else f"'{value}'"
        raise ConfigError(
            f"config key '{key}' expects {want.__name__}, got {type(value).__name__} {shown}",
            **_example(key, current))
    return value


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys in place, checking that each key exists and each value has its type."""
    for key, value in overrides.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ConfigDict):
                raise _unknown_key(key, config)
            node = node[part]
        leaf = parts[-1]
        if leaf not in node or isinstance(node[leaf], ConfigDict):
            raise _unknown_key(key, config)
        with node.unlocked():
            node[leaf] = _coerce(key, value, node[leaf])


def apply_preset(config: ConfigDict, explicit: set[str] = frozenset()) -> None:
    """Set the mesh sizes of `sharding.preset`, except those given explicitly as overrides."""
    name = config.sharding.preset
    if not name:
        return
    if name not in PRESETS:
        raise ConfigError(
            f"unknown sharding.preset '{name}'; known presets: {', '.join(PRESETS)}",
            key="sharding.preset", value="fsdp", verb="set e.g.",
            note=", or leave it empty and set the mesh.* sizes yourself")
    with config.mesh.unlocked():
        for axis, size in PRESETS[name].items():
            if f"mesh.{axis}" not in explicit:
                config.mesh[axis] = size


def validate(config: ConfigDict) -> None:
    """Checks that need no devices. Mesh/batch checks happen when the mesh is built."""

    def positive(key: str, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} must be > 0, got {value}", key=key, value="<positive>")

    def in_range(key: str, value: float, low: float, high: float, *, high_open: bool = False,
                 note: str = "") -> None:
        ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value and (
            value < high if high_open else value <= high)
        if not ok:
            bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
            raise ConfigError(f"{key} must be in {bounds}{note}, got {value}", key=key,
                              value=f"<value in {bounds}>")

    def non_negative(key: str, value: float, note: str = "") -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be >= 0{note}, got {value}", key=key,
                              value="<value >= 0>")

    positive("train.steps", config.train.steps)
    positive("train.batch_size", config.train.batch_size)
    positive("train.log_every", config.train.log_every)
    positive("train.microbatches", config.train.microbatches)
    positive("train.eval_every", config.train.eval_every)
    positive("optim.lr", config.optim.lr)
    positive("train.sigterm_grace_s", config.train.sigterm_grace_s)
    positive("checkpoint.every", config.checkpoint.every)
    positive("checkpoint.keep", config.checkpoint.keep)
    if config.train.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got '{config.train.nonfinite}'")
    non_negative("optim.warmup_steps", config.optim.warmup_steps)
    non_negative("train.seed", config.train.seed)
    non_negative("train.stop_at", config.train.stop_at, " (0 = run to train.steps)")
    in_range("optim.b1", config.optim.b1, 0, 1, high_open=True)
    in_range("optim.b2", config.optim.b2, 0, 1, high_open=True)
    positive("optim.eps", config.optim.eps)
    in_range("optim.min_lr_ratio", config.optim.min_lr_ratio, 0, 1)
    non_negative("optim.weight_decay", config.optim.weight_decay)
    non_negative("optim.grad_clip", config.optim.grad_clip, " (0 = no clipping)")
    non_negative("checkpoint.every_seconds", config.checkpoint.get("every_seconds", 0.0),
                 " (0 = off)")
    non_negative("checkpoint.storage_retries", config.checkpoint.get("storage_retries", 32))
    if config.profile.steps and (
        len(config.profile.steps) != 2 or not 0 < config.profile.steps[0] <= config.profile.steps[1]
    ):
        raise ConfigError(
            f"profile.steps must be (first, last) with 0 < first <= last, got {config.profile.steps}",
            key="profile.steps", value="[10,12]", verb="e.g.")
    for axis, size in config.mesh.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis} must be a positive int or -1 (fill), got {size}")
    for section in ("optim", "model"):  # computed with in float32: must fit it
        for key, value in config[section].items():
            if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
                raise ConfigError(f"{section}.{key}={value} is beyond float32's range "
                                  f"(±{FLOAT32_MAX:.3g}), which the computation uses",
                                  key=f"{section}.{key}", value="<smaller value>")
    from infra.models import hyper_params

    hyper_params(config.model)  # types and ranges of every model.* key, before anything is built
    _validate_lora(config)


def _validate_lora(config: ConfigDict) -> None:
    """`finetune.lora.*`: a positive integer rank (or unset), alpha > 0, a regex, an LM task."""
    if "finetune" not in config:
        return
    c = config.finetune.lora
    if c.rank is None:
        return
    if isinstance(c.rank, bool) or not isinstance(c.rank, int) or c.rank <= 0:
        raise ConfigError(f"finetune.lora.rank must be a positive integer (leave it unset for "
                          f"full fine-tuning), got {c.rank}", key="finetune.lora.rank", value=8)
    if isinstance(c.alpha, bool) or not isinstance(c.alpha, (int, float)) or not (
            math.isfinite(c.alpha) and c.alpha > 0):
        raise ConfigError(f"finetune.lora.alpha must be > 0, got {c.alpha}",
                          key="finetune.lora.alpha", value=16.0)
    from infra.models.lora import compile_targets

    compile_targets(c.targets)
    if config.task not in ("lm", "sft") or config.model.name != "transformer":
        raise ConfigError(f"finetune.lora needs a transformer language model (task lm or sft), "
                          f"not task {config.task!r} with model {config.model.name!r}",
                          key="finetune.lora.rank", value="<unset>")


CONFIG_FILE = "config.json"
FLOAT32_MAX = 3.4028234663852886e38


def save(config: ConfigDict, workdir: str | os.PathLike):
    """Write the resolved config as `<workdir>/config.json`."""
    from infra import paths

    path = paths.path(workdir) / CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    return path


def read_saved(workdir: str | os.PathLike) -> dict:
    """The JSON a run saved in `<workdir>/config.json`, as it is (UserError when there is none
    or it is not a config)."""
    from infra import paths

    workdir = paths.path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir '{workdir}' does not exist; pass the --workdir of a training run")
    path = workdir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no {CONFIG_FILE} in '{workdir}'; pass the --workdir of a training "
                        f"run") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); pass the --workdir of a "
                        f"training run") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a config written by `python -m infra train`")
    return raw


def load_saved(workdir: str | os.PathLike, raw: dict | None = None) -> ConfigDict:
    """The resolved config a run saved in `<workdir>/config.json` (or `raw`, already read from
    it), validated and locked. Keys added to the stack since it was written take their
    defaults; a config without a known task or a model section is refused."""
    raw = read_saved(workdir) if raw is None else raw
    path = f"{workdir}/{CONFIG_FILE}"
    from infra.tasks import TASKS

    if raw.get("task") not in TASKS:
        raise UserError(f"{path} names no known task (task {raw.get('task')!r}); pass the "
                        f"--workdir of a training run")
    if not isinstance(raw.get("model"), dict):
        raise UserError(f"{path} has no model section; pass the --workdir of a training run")
    config = base_config(raw["task"])
    with config.unlocked():
        for section, value in raw.items():
            current = config.get(section)
            if not isinstance(current, ConfigDict):
                config[section] = value
                continue
            if not isinstance(value, dict):
                raise UserError(f"{path}: '{section}' is {type(value).__name__}, not a section; "
                                f"pass the --workdir of a training run")
            # model and data are whatever the run used; other sections gain keys added since
            kept = {} if section in ("model", "data") else current.to_dict()
            config[section] = ConfigDict({**kept, **value})
    complete(config)
    validate(config)
    config.lock()
    return config


# --------------------------------------------------------------------------- listing


def list_experiment_files() -> list[Path]:
    return sorted(p for p in EXPERIMENTS_DIR.glob("*.py") if not p.name.startswith("_"))


def describe_experiments() -> list[tuple[str, str, dict[str, str]]]:
    """(file name, one-line description, {variant: description}) for every experiment."""
    out = []
    for path in list_experiment_files():
        module = import_experiment(path)
        doc = (module.__doc__ or "").strip().splitlines()
        out.append((f"experiments/{path.name}", doc[0] if doc else "", dict(getattr(module, "VARIANTS", {}))))
    return out
