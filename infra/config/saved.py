"""A run's saved config (`<workdir>/config.json`): writing it, reading it back as the run used
it, with the keys added to the stack since taking their defaults."""

from __future__ import annotations

import json
import os

from ml_collections import ConfigDict

from infra import paths
from infra.config.base import base_config, complete, validate
from infra.errors import UserError

CONFIG_FILE = "config.json"


def save(config: ConfigDict, workdir: str | os.PathLike):
    """Write the resolved config as `<workdir>/config.json`."""
    path = paths.path(workdir) / CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    return path


def read_saved(workdir: str | os.PathLike) -> dict:
    """The JSON a run saved in `<workdir>/config.json`, as it is (UserError when there is none
    or it is not a config)."""
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
