"""Typed model hyper-parameters: each model declares its `model.*` keys once.

A model module defines a frozen dataclass (a `HyperParams` subclass, the `infra.section`
mechanism every config section uses) whose fields are the model's config keys, with their types
and defaults, and whose `validate` checks their values; the model class names it as `Config`
and takes an instance in its constructor. The config system reads the defaults from it
(`infra.models.model_config`), so every option a model reads is a known, overridable `model.*`
key, and a value of the wrong type or range is refused with the key's name before anything is
built. Fields without a default are required: the experiment (or the base config) must set them.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from infra.errors import ConfigError
from infra.section import Section

H = TypeVar("H", bound="HyperParams")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class HyperParams(Section):
    """Base of every model's hyper-parameters; `model` names the registered model in messages."""

    prefix: ClassVar[str] = "model"
    float32: ClassVar[bool] = True
    model: ClassVar[str] = "model"
    #: Constructor inputs the task takes from its data (not config keys).
    from_data: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple]] = {"dtype": DTYPES, "param_dtype": DTYPES}

    @classmethod
    def from_config(cls: type[H], section: Mapping[str, Any]) -> H:
        """The hyper-parameters in a config's `model` section (`name` is ignored); unknown or
        missing keys are a ConfigError that names them."""
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        values.pop("name", None)
        accepted = cls.accepted()
        for key in values:
            if key in cls.from_data:
                raise ConfigError(f"model.{key} comes from the data for model {cls.model!r}; "
                                  "remove it from the experiment's model section")
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f"; did you mean model.{close[0]}?" if close else ""
                raise ConfigError(f"unknown hyper-parameter model.{key} for model {cls.model!r}"
                                  f"{hint}; accepted: {', '.join(accepted)}")
        missing = [k for k in cls.required() if k not in values]
        if missing:
            raise ConfigError(f"model {cls.model!r} needs model.{missing[0]}; missing: "
                              f"{', '.join('model.' + k for k in missing)}")
        return cls(**values)
