"""Typed config sections: each part of the stack declares the config keys it reads once.

A section is a frozen dataclass (a `Section` subclass) whose fields are the keys of one part of
the config (`train`, `optim`, `checkpoint`, `mesh`, ..., a model's `model`, a task's `data`),
with their types and defaults, and whose `validate` checks their values. The config system
builds its defaults from the dataclass (`defaults`), so every option the code reads is a known,
overridable key; `from_config` turns the (untyped, overridable) `ConfigDict` section into the
typed, checked object the component then takes. A value of the wrong type or range is refused
with the key's dotted name before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from infra.errors import ConfigError

S = TypeVar("S", bound="Section")
FLOAT32_MAX = 3.4028234663852886e38


def _is_type(value: Any, hint: Any) -> bool:
    """`value` fits the field annotation `hint` (int is accepted for float; bool is not an int)."""
    if hint is Any:
        return True
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every typed config section; `prefix` is its dotted place in the config."""

    prefix: ClassVar[str] = ""
    #: Fields that take one of a few values.
    choices: ClassVar[dict[str, tuple]] = {}
    #: Config keys that are not Python identifiers -> their field (`init.from` -> `from_`).
    renamed: ClassVar[dict[str, str]] = {}
    #: Float fields are used in float32 arithmetic: values beyond its range are refused.
    float32: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.choices:
                if not isinstance(value, str) or value not in self.choices[f.name]:
                    raise ConfigError(f"{self.key(f.name)} is {value!r}; expected one of "
                                      f"{', '.join(self.choices[f.name])}")
                continue
            if isinstance(value, list):  # JSON (config.json) has no tuples
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if not _is_type(value, hints[f.name]):
                raise ConfigError(f"{self.key(f.name)} must be {_type_name(hints[f.name])}, got "
                                  f"{value!r} ({type(value).__name__})")
            if hints[f.name] is float and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))
            if self.float32 and isinstance(value, float) and math.isfinite(value) and (
                    abs(value) > FLOAT32_MAX):
                raise ConfigError(f"{self.key(f.name)}={value} is beyond float32's range "
                                  f"(±{FLOAT32_MAX:.3g}), which the computation uses",
                                  key=self.key(f.name), value="<smaller value>")
        self.validate()

    def validate(self) -> None:
        """Value checks beyond the types (ConfigError naming the key)."""

    # ------------------------------------------------------------------ reading a section

    @classmethod
    def _config_key(cls, field: str) -> str:
        return {v: k for k, v in cls.renamed.items()}.get(field, field)

    @classmethod
    def key(cls, field: str) -> str:
        """The dotted config key of `field` (`train.steps`)."""
        return f"{cls.prefix}.{cls._config_key(field)}"

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The config keys that have a default, with it (as written: `30`, not `30.0`)."""
        return {cls._config_key(f.name): f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    @classmethod
    def required(cls) -> list[str]:
        return [cls._config_key(f.name) for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    @classmethod
    def accepted(cls) -> list[str]:
        return [cls._config_key(f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def unknown_key(cls, key: str) -> ConfigError:
        accepted = cls.accepted()
        close = difflib.get_close_matches(key, accepted, n=1)
        hint = f"; did you mean '{cls.prefix}.{close[0]}'?" if close else ""
        return ConfigError(f"unknown config key '{cls.prefix}.{key}'{hint}; accepted: "
                           f"{', '.join(accepted)}")

    @classmethod
    def from_config(cls: type[S], section: Mapping[str, Any] | Section) -> S:
        """The typed section of a config's (untyped) section; unknown or missing keys are a
        ConfigError that names them. A typed section is returned as it is."""
        if isinstance(section, cls):
            return section
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        accepted = set(cls.accepted())
        for key in values:
            if key not in accepted:
                raise cls.unknown_key(key)
        missing = [k for k in cls.required() if k not in values]
        if missing:
            raise ConfigError(f"{cls.key(missing[0])} is not set; missing: "
                              f"{', '.join(cls.key(k) for k in missing)}")
        return cls(**{cls.renamed.get(k, k): v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return {self._config_key(k): v for k, v in dataclasses.asdict(self).items()}

    def __getitem__(self, key: str) -> Any:
        return getattr(self, self.renamed.get(key, key))

    # ------------------------------------------------------------------ checks for `validate`

    def positive(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            if not (_number(value) and value > 0):
                raise ConfigError(f"{self.key(field)} must be > 0, got {value}",
                                  key=self.key(field), value="<positive>")

    def non_negative(self, field: str, note: str = "") -> None:
        value = getattr(self, field)
        if not (_number(value) and value >= 0):
            raise ConfigError(f"{self.key(field)} must be >= 0{note}, got {value}",
                              key=self.key(field), value="<value >= 0>")

    def one_of(self, field: str, choices: tuple) -> None:
        """ConfigError unless the field's value is one of `choices` (the first is suggested)."""
        value = getattr(self, field)
        if value not in choices:
            raise ConfigError(f"{self.key(field)} must be one of {', '.join(map(str, choices))}, "
                              f"got {value!r}", key=self.key(field), value=choices[0])

    def in_range(self, field: str, low: float, high: float, *, high_open: bool = False,
                 note: str = "", example: Any = None) -> None:
        value = getattr(self, field)
        ok = _number(value) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
            raise ConfigError(f"{self.key(field)} must be in {bounds}{note}, got {value}",
                              key=self.key(field),
                              value=f"<value in {bounds}>" if example is None else example)
