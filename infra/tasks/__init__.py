"""Task registry: `config.task` names one of these."""

from __future__ import annotations

from infra.errors import ConfigError
from infra.tasks.base import Task
from infra.tasks.lm import LanguageModelTask

TASKS: dict[str, type[Task]] = {"lm": LanguageModelTask}


def get_task(config) -> Task:
    """Instantiate the task named by `config.task`."""
    try:
        cls = TASKS[config.task]
    except KeyError:
        raise ConfigError(
            f"unknown task '{config.task}' (config key task); known tasks: {', '.join(TASKS)}"
        ) from None
    return cls(config)
