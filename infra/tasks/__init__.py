"""Task registry: `config.task` names one of these.

Entries are `module:Class` strings, imported only when a run asks for them, so a language-model
run never imports scikit-learn or statsmodels.
"""

from __future__ import annotations

import importlib

from infra.errors import ConfigError
from infra.tasks.base import Task

TASKS: dict[str, str] = {
    "lm": "infra.tasks.lm:LanguageModelTask",
    "image": "infra.tasks.image:ImageClassificationTask",
    "ctr": "infra.tasks.ctr:ClickThroughTask",
    "forecast": "infra.tasks.forecast:ForecastTask",
}


def get_task_class(name: str) -> type[Task]:
    """The Task class registered as `name`."""
    try:
        module, cls = TASKS[name].split(":")
    except KeyError:
        raise ConfigError(
            f"unknown task '{name}' (config key task); known tasks: {', '.join(TASKS)}"
        ) from None
    return getattr(importlib.import_module(module), cls)


def get_task(config) -> Task:
    """Instantiate the task named by `config.task`."""
    return get_task_class(config.task)(config)


__all__ = ["TASKS", "Task", "get_task", "get_task_class"]
