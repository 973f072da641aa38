"""Experiment configs: the base defaults, loading `experiments/<name>.py:<variant>`, typed
sections, command-line overrides, a run's saved config.

| module | job |
|---|---|
| `sections.py` | the loop's typed sections (`train`, `optim`, `checkpoint`, `mesh`, ...), rules, presets |
| `base.py` | `base_config`, filling in defaults (`complete`), checking a whole config (`validate`) |
| `experiments.py` | finding, importing and listing experiment files |
| `overrides.py` | `--config.k=v`: parsed, checked against existing keys, typed |
| `loading.py` | `load(spec, overrides)`: all of the above, and `init.from`'s architecture |
| `saved.py` | `<workdir>/config.json`: written by a run, read back by every command |
"""

from infra.config.base import DEFAULT_MODEL, base_config, complete, validate
from infra.config.experiments import (EXPERIMENTS_DIR, PROJECT_ROOT, describe_experiments,
                                      import_experiment, list_experiment_files,
                                      resolve_experiment_path)
from infra.config.loading import apply_init_from, load
from infra.config.overrides import apply_overrides, flatten_keys, parse_override_args
from infra.config.saved import CONFIG_FILE, load_saved, read_saved, save
from infra.config.sections import (DEFAULT_RULES, PRESETS, CheckpointConfig, DistributedConfig,
                                   InitConfig, LoraConfig, MeshConfig, OptimConfig,
                                   ProfileConfig, ShardingConfig, TrainConfig, apply_preset)
from infra.errors import ConfigError, UserError

__all__ = [
    "DEFAULT_MODEL", "base_config", "complete", "validate", "EXPERIMENTS_DIR", "PROJECT_ROOT",
    "describe_experiments", "import_experiment", "list_experiment_files",
    "resolve_experiment_path", "apply_init_from", "load", "apply_overrides", "flatten_keys",
    "parse_override_args", "CONFIG_FILE", "load_saved", "read_saved", "save", "DEFAULT_RULES",
    "PRESETS", "CheckpointConfig", "DistributedConfig", "InitConfig", "LoraConfig", "MeshConfig",
    "OptimConfig", "ProfileConfig", "ShardingConfig", "TrainConfig", "apply_preset", "ConfigError", "UserError",
]
