"""Command-line overrides (`--config.optim.lr=3e-4`): parsed, checked against the keys that
exist and converted to each key's type (literals only: never runs code)."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict

from infra.errors import ConfigError


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`["--config.a.b=1", "--config.c", "x"]` -> `{"a.b": "1", "c": "x"}` (values as text)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(
                f"unrecognised argument '{arg}'; overrides look like --config.optim.lr=3e-4"
            )
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --config.{key} has no value; write --config.{key}=VALUE")
            i += 1
            value = args[i]
        out[key] = value
        i += 1
    return out


def flatten_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key, dotted."""
    keys = []
    for k, v in config.items():
        if isinstance(v, ConfigDict):
            keys += flatten_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _unknown_key(key: str, config: ConfigDict) -> ConfigError:
    keys = flatten_keys(config)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # fall back to a match on the last component (`lr` -> `optim.lr`)
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m infra list` and the experiment file"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _example(key: str, current: Any) -> dict:
    """The current value as the fix's example (`e.g. train.steps=1000`), as it is typed."""
    if isinstance(current, bool):
        return dict(key=key, value=str(current).lower(), verb="e.g.")
    if isinstance(current, (int, float)):
        return dict(key=key, value=current, verb="e.g.")
    return {}


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Convert `value` (text from the command line, or a Python value) to the type of `current`."""
    want = type(current)
    if isinstance(value, str) and want is float and value.strip().lower().lstrip("+-") in (
        "nan", "inf", "infinity"
    ):
        return float(value)  # not a Python literal; `validate` says which range the key needs
    if isinstance(value, str) and want is not str:
        if want is bool:
            low = value.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ConfigError(f"config key '{key}' expects a bool (true/false), got '{value}'",
                              **_example(key, current))
        try:
            value = ast.literal_eval(value)  # literals only: never runs code
        except (ValueError, SyntaxError):
            if current is None:
                return value
            raise ConfigError(f"config key '{key}' expects {want.__name__}, got '{value}'",
                              **_example(key, current)) from None
    if current is None or value is None:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want in (tuple, list) and isinstance(value, (tuple, list)):
        return want(value)
    if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
        shown = value if not isinstance(value, str) else f"'{value}'"
        raise ConfigError(
            f"config key '{key}' expects {want.__name__}, got {type(value).__name__} {shown}",
            **_example(key, current))
    return value


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys in place, checking that each key exists and each value has its type."""
    for key, value in overrides.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ConfigDict):
                raise _unknown_key(key, config)
            node = node[part]
        leaf = parts[-1]
        if leaf not in node or isinstance(node[leaf], ConfigDict):
            raise _unknown_key(key, config)
        with node.unlocked():
            node[leaf] = _coerce(key, value, node[leaf])
