"""The base config (every key the stack reads, with its default), completing an experiment's
config with the defaults it leaves out, and validating a whole config.

The loop's sections are typed in `infra.config.sections`, a model's `model.*` keys in the model
(`HyperParams`), a task's `data.*` keys in the task (`Task.Data`). Models and tasks are imported
when a config is built, not when this module is: the CLI imports it before the devices are set,
which must precede JAX's start-up.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from infra.config.sections import LOOP_SECTIONS, defaults_tree, section_of
from infra.errors import ConfigError

# The size of the model `base_config` trains when an experiment sets none (`lm.py:tiny`); the
# transformer's other hyper-parameters default in `infra.models.transformer_config`.
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


def base_config(task: str = "lm") -> ConfigDict:
    """Every key the stack reads, with its default. Experiments override a subset.

    `model.*` defaults come from the model's typed hyper-parameters (`infra.models`), `data.*`
    from the task (`Task.Data`), the loop's sections from `infra.config.sections`.
    """
    from infra.models import model_config
    from infra.tasks import get_task_class

    c = ConfigDict()
    c.experiment = ""  # filled in by `load`: the spec the config came from
    c.task = task
    c.model = model_config("transformer", **DEFAULT_MODEL)
    c.data = ConfigDict(get_task_class(task).Data.defaults())
    for name, section in defaults_tree().items():
        c[name] = section
    return c


def complete(config: ConfigDict) -> None:
    """Add the defaults of every key the experiment left out (the loop's sections, the model's
    `model.*`, the task's `data.*`), so each option the stack reads exists and can be overridden
    by name."""
    from infra.models import complete_model_config
    from infra.tasks import get_task_class

    complete_model_config(config.model)
    _add_missing(config.data, ConfigDict(get_task_class(config.task).Data.defaults()))
    with config.unlocked():
        _add_missing(config, defaults_tree())


def _add_missing(node: ConfigDict, defaults: ConfigDict) -> None:
    with node.unlocked():
        for key, value in defaults.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, ConfigDict) and isinstance(node[key], ConfigDict):
                _add_missing(node[key], value)


def validate(config: ConfigDict) -> None:
    """Check every section where it is declared (types, ranges, unknown keys), then what spans
    sections. Needs no devices; mesh and batch checks happen when the mesh is built."""
    from infra.models import hyper_params
    from infra.tasks import get_task_class

    for path, section in LOOP_SECTIONS.items():
        section.from_config(section_of(config, path) or {})
    hyper_params(config.model)  # types and ranges of every model.* key, before anything is built
    get_task_class(config.task).Data.from_config(config.data)
    _validate_lora(config)


def _validate_lora(config: ConfigDict) -> None:
    """LoRA adapts a transformer language model's weights that `targets` matches."""
    lora = LOOP_SECTIONS["finetune.lora"].from_config(config.finetune.lora)
    if not lora.enabled:
        return
    from infra.models.lora import compile_targets

    compile_targets(lora.targets)
    from infra.tasks import LM_TASKS

    if config.task not in LM_TASKS or config.model.name != "transformer":
        raise ConfigError(f"finetune.lora needs a transformer language model (task "
                          f"{', '.join(LM_TASKS)}), "
                          f"not task {config.task!r} with model {config.model.name!r}",
                          key="finetune.lora.rank", value="<unset>")
