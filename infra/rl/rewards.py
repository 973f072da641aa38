"""Reward functions: plain Python callables named in the config (`rl.rewards`).

    rl.rewards = "exact_answer, format:0.2"       # weights default to 1

A bare name is a function of the run's experiment file (`config.experiment`); a dotted name
(`infra.data.arithmetic.exact_answer`) is imported. Each is called once per rollout batch as

    fn(prompts, completions, **example) -> list[float]

with the prompts (text, or the chat messages), the completions' text and every other field of
the prompts' records as lists aligned with them (an `answer` column, say). The reward of a
completion is the weighted sum; each function's mean is logged as `reward/<name>`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Sequence

import numpy as np

from infra.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: Callable[..., Sequence[float]]
    weight: float


def parse(spec: str) -> list[tuple[str, float]]:
    """`"a, b:0.5"` -> [("a", 1.0), ("b", 0.5)]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = math.nan
        if not name.strip() or not math.isfinite(w):
            raise ConfigError(f"rl.rewards entry {part!r} is not name[:weight]",
                              key="rl.rewards", value="'exact_answer,format:0.2'", verb="e.g.")
        out.append((name.strip(), w))
    if not out:
        raise ConfigError("rl.rewards is empty; name the reward functions", key="rl.rewards",
                          value="'exact_answer'", verb="e.g.")
    return out


def resolve(spec: str, experiment: str) -> list[Reward]:
    """The reward functions of `spec`, bare names looked up in the experiment file of
    `experiment` (`experiments/grpo.py:variant`)."""
    module = None
    out = []
    for name, weight in parse(spec):
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                owner = importlib.import_module(module_name)
            except ImportError as e:
                raise ConfigError(f"rl.rewards: cannot import {module_name!r} ({e})") from None
            where = module_name
        else:
            if module is None:
                module = _experiment_module(experiment)
            owner, attr, where = module, name, f"experiment {experiment.split(':')[0]!r}"
        fn = getattr(owner, attr, None)
        if not callable(fn):
            raise ConfigError(f"rl.rewards: {where} has no function {attr!r}",
                              key="rl.rewards", value="<a function name>")
        out.append(Reward(name, fn, weight))
    return out


def _experiment_module(experiment: str):
    from infra.config.experiments import import_experiment, resolve_experiment_path

    if not experiment:
        raise ConfigError("rl.rewards names a function but the config has no experiment file; "
                          "use a dotted name (package.module.function)", key="rl.rewards")
    return import_experiment(resolve_experiment_path(experiment.split(":")[0]))


def score(rewards: Sequence[Reward], prompts: list, completions: list[str],
          example: dict[str, list]) -> tuple[np.ndarray, dict[str, float]]:
    """(weighted reward per completion (float32), {"reward/<name>": mean}) ."""
    total = np.zeros(len(completions), np.float64)
    means = {}
    for r in rewards:
        try:
            values = list(r.fn(prompts, completions, **example))
            arr = np.asarray(values, np.float64)
        except Exception as e:  # noqa: BLE001 - the user's code: one line naming it
            columns = ", ".join(example) or "none"
            raise UserError(f"reward function {r.name!r} raised {type(e).__name__}: {e} (it is "
                            "called as fn(prompts, completions, **example) and must return one "
                            f"number per completion; the example's fields: {columns})") from None
        if arr.shape != (len(completions),) or not np.all(np.isfinite(arr)):
            raise UserError(f"reward function {r.name!r} returned {_describe(values)} for "
                            f"{len(completions)} completions; it must return one finite number "
                            "per completion")
        total += r.weight * arr
        means[f"reward/{r.name}"] = float(arr.mean())
    return total.astype(np.float32), means


def _describe(values: Any) -> str:
    text = repr(values)
    return text if len(text) <= 80 else text[:77] + "..."
