"""Model registry: ``model.name`` in the config selects a class, the other ``model.*`` keys are its
keyword arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flax import nnx

from infra.errors import ConfigError

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make the model class buildable as ``model.name = name``."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    """The class registered as ``name``; ConfigError if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = available_models()
        example = known[0] if known else "<name>"
        raise ConfigError(f"unknown model {name!r} (config model.name); known models: "
                          f"{', '.join(known)}; set e.g. --config.model.name={example}") from None


def _hyper_parameters(cls: type) -> tuple[list[str], list[str], bool]:
    """(accepted keyword names, required ones, accepts **kwargs) of cls.__init__, minus rngs."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds and p.name != "rngs"]
    required = [p.name for p in params
                if p.kind in kinds and p.name != "rngs" and p.default is inspect.Parameter.empty]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return names, required, var_kw


def build_model(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model that ``model_cfg`` (the config's ``model`` section) names.

    Unknown names, unknown hyper-parameters and missing required ones raise ConfigError.
    """
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    if "name" not in cfg:
        raise ConfigError(f"model.name is not set; known models: {', '.join(available_models())}")
    name = cfg.pop("name")
    cls = get_model_class(name)
    accepted, required, var_kw = _hyper_parameters(cls)
    if not var_kw:
        unknown = [k for k in cfg if k not in accepted]
        if unknown:
            raise ConfigError(f"unknown hyper-parameter model.{unknown[0]} for model {name!r}; "
                              f"accepted: {', '.join(accepted)}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"model {name!r} needs model.{missing[0]}; missing: "
                          f"{', '.join('model.' + k for k in missing)}")
    return cls(**cfg, rngs=rngs)


# Importing a model module registers its classes (after `register` exists, above).
from infra.models import dlrm, forecaster, transformer, vision  # noqa: E402,F401

__all__ = ["register", "get_model_class", "available_models", "build_model"]
