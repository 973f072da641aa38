"""Typed model hyper-parameters: each model declares its `model.*` keys once.

A model module defines a frozen dataclass (a `HyperParams` subclass) whose fields are the
model's config keys, with their types and defaults, and whose `validate` checks their values;
the model class names it as `Config` and takes an instance in its constructor. The config
system reads the defaults from it (`infra.models.model_config`), so every option a model reads is
a known, overridable `model.*` key, and a value of the wrong type or range is refused with the
key's name before anything is built. Fields without a default are required: the experiment (or
the base config) must set them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from infra.errors import ConfigError

H = TypeVar("H", bound="HyperParams")
DTYPES = ("float32", "bfloat16", "float16")


def _is_type(value: Any, hint: Any) -> bool:
    """`value` fits the field annotation `hint` (int is accepted for float; bool is not an int)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_is_type(v, args[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_is_type(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """Base of every model's hyper-parameters; `model` names the registered model in messages."""

    model: ClassVar[str] = "model"
    #: Constructor inputs the task takes from its data (not config keys).
    from_data: ClassVar[tuple[str, ...]] = ()
    #: Fields that take one of a few values.
    choices: ClassVar[dict[str, tuple]] = {"dtype": DTYPES, "param_dtype": DTYPES}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.choices:
                if not isinstance(value, str) or value not in self.choices[f.name]:
                    raise ConfigError(f"model.{f.name} is {value!r}; expected one of "
                                      f"{', '.join(self.choices[f.name])}")
                continue
            if isinstance(value, list):  # JSON (config.json) has no tuples
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if _is_type(value, hints[f.name]):
                if hints[f.name] is float and isinstance(value, int):
                    object.__setattr__(self, f.name, float(value))
                continue
            raise ConfigError(f"model.{f.name} must be {_type_name(hints[f.name])}, got "
                              f"{value!r} ({type(value).__name__})")
        self.validate()

    def validate(self) -> None:
        """Value checks beyond the types (ConfigError naming the key)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The fields that have a default, with it."""
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    @classmethod
    def required(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    @classmethod
    def from_config(cls: type[H], section: Mapping[str, Any]) -> H:
        """The hyper-parameters in a config's `model` section (`name` is ignored); unknown or
        missing keys are a ConfigError that names them."""
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        values.pop("name", None)
        accepted = [f.name for f in dataclasses.fields(cls)]
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
