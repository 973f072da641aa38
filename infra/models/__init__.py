"""Model registry: ``model.name`` in the config selects a class, the other ``model.*`` keys are
its typed hyper-parameters (the class's ``Config``, a `HyperParams` dataclass).

The built-in models are listed by name in `BUILTIN_MODELS` and imported when first asked for;
a model defined elsewhere (an experiment file) adds itself with `register`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flax import nnx
from ml_collections import ConfigDict

from infra.errors import ConfigError
from infra.models.hparams import HyperParams

# config name -> (module, class) of the models this package ships
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "transformer": ("infra.models.transformer", "Transformer"),
    "vit": ("infra.models.vision", "ViT"),
    "convnet": ("infra.models.vision", "ConvNet"),
    "dlrm": ("infra.models.dlrm", "DLRM"),
    "forecaster": ("infra.models.forecaster", "Forecaster"),
}
_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make the model class buildable as ``model.name = name``.

    The class must have a ``Config`` attribute (its `HyperParams` subclass) and take
    ``(config, *, rngs, **inputs_from_the_data)``.
    """

    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]}")
        if not (isinstance(getattr(cls, "Config", None), type) and issubclass(cls.Config, HyperParams)):
            raise TypeError(f"model {name!r}: {cls.__name__}.Config must be a HyperParams dataclass")
        cls.Config.model = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_models() -> list[str]:
    """Model names (built-in and registered), sorted."""
    return sorted(set(_REGISTRY) | set(BUILTIN_MODELS))


def get_model_class(name: str) -> type:
    """The class registered as ``name``; ConfigError if there is none."""
    if isinstance(name, str) and name not in _REGISTRY and name in BUILTIN_MODELS:
        module, attr = BUILTIN_MODELS[name]
        register(name)(getattr(importlib.import_module(module), attr))
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = available_models()
        example = known[0] if known else "<name>"
        raise ConfigError(f"unknown model {name!r} (config model.name); known models: "
                          f"{', '.join(known)}", key="model.name", value=example,
                          verb="set e.g.") from None


def _name(model_cfg: Mapping[str, Any]) -> str:
    if "name" not in model_cfg:
        raise ConfigError(f"model.name is not set; known models: {', '.join(available_models())}")
    return model_cfg["name"]


def hyper_params(model_cfg: Mapping[str, Any]) -> HyperParams:
    """The typed, validated hyper-parameters of a config's ``model`` section."""
    return get_model_class(_name(model_cfg)).Config.from_config(model_cfg)


def model_config(name: str, **values: Any) -> ConfigDict:
    """A ``model`` config section for ``name``: every hyper-parameter that has a default, then
    ``values`` (which must include the required ones)."""
    return ConfigDict({"name": name, **get_model_class(name).Config.defaults(), **values})


def complete_model_config(model_cfg: ConfigDict) -> None:
    """Add the named model's defaults for the keys ``model_cfg`` leaves out (in place), so every
    hyper-parameter is a known config key."""
    defaults = get_model_class(_name(model_cfg)).Config.defaults()
    with model_cfg.unlocked():
        for key, value in defaults.items():
            if key not in model_cfg:
                model_cfg[key] = value


def build_model(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs, **inputs: Any) -> nnx.Module:
    """Build the model that ``model_cfg`` (the config's ``model`` section) names; ``inputs`` are
    the shapes a task takes from its data (e.g. DLRM's vocabulary sizes).

    Unknown names, unknown hyper-parameters, missing required ones and bad values raise
    ConfigError.
    """
    return get_model_class(_name(model_cfg))(hyper_params(model_cfg), rngs=rngs, **inputs)


__all__ = ["HyperParams", "register", "get_model_class", "available_models", "build_model",
           "hyper_params", "model_config", "complete_model_config"]
