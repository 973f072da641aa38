"""Task registry: `config.task` names one of these.

Entries are `module:Class` strings, imported only when a run asks for them, so a language-model
run never imports scikit-learn or statsmodels.
"""

from __future__ import annotations

import importlib
from typing import Any

from infra.errors import ConfigError
from infra.tasks.base import Task

TASKS: dict[str, str] = {
    "lm": "infra.tasks.lm:LanguageModelTask",
    "sft": "infra.tasks.sft:SFTTask",
    "image": "infra.tasks.image:ImageClassificationTask",
    "ctr": "infra.tasks.ctr:ClickThroughTask",
    "forecast": "infra.tasks.forecast:ForecastTask",
    "grpo": "infra.tasks.grpo:GRPOTask",
    "dpo": "infra.tasks.dpo:DPOTask",
}
#: Tasks that train the transformer language model (generate, serve, export and LoRA apply).
LM_TASKS = ("lm", "sft", "grpo", "dpo")
#: Of those, the ones whose data may be chats (a run's chat template is exported with it).
CHAT_TASKS = ("sft", "grpo", "dpo")


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


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules of a run: the config's `sharding.rules`, then its task's own."""
    return tuple(tuple(r) for r in config.sharding.rules) + get_task_class(config.task).logical_rules


__all__ = ["CHAT_TASKS", "LM_TASKS", "TASKS", "Task", "get_task", "get_task_class", "logical_rules"]
