"""Experiment files: finding `experiments/<name>.py`, importing one, listing them all.

An experiment file defines `get_config(arg: str | None) -> ConfigDict`, usually by calling
`base_config()` and changing what it needs, and a `VARIANTS` dict (variant name -> one-line
description) that `python -m infra list` prints. Experiment files are Python: loading one runs it.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

from ml_collections import ConfigDict

from infra.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"


def resolve_experiment_path(name: str) -> Path:
    """`experiments/lm.py`, `lm.py` or `lm` -> an existing file (cwd first, then the project)."""
    candidates = [Path(name)]
    bare = Path(name).name
    if not bare.endswith(".py"):
        bare += ".py"
        candidates.append(Path(name + ".py"))
    candidates.append(EXPERIMENTS_DIR / bare)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    known = ", ".join(p.stem for p in list_experiment_files()) or "none"
    raise ConfigError(
        f"unknown experiment '{name}': no such file; known experiments in "
        f"{EXPERIMENTS_DIR}: {known}; pass --config experiments/<name>.py[:variant]"
    )


def import_experiment(path: Path):
    """Import an experiment file as a module (it is Python: this runs its code)."""
    module_name = f"infra_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the experiment's own code: report where it failed
        del sys.modules[module_name]
        raise ConfigError(f"experiment {path} failed to load: {_where(e, path)}; fix the "
                          f"experiment file") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment {path} has no get_config(arg) function; add one")
    return module


def _where(e: BaseException, path: Path) -> str:
    """`SyntaxError at line 3: invalid syntax` for an exception raised by the file at `path`."""
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else None
    message = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().splitlines()
    at = f" at line {line}" if line else ""
    return f"{type(e).__name__}{at}: {message[0][:200] if message else ''}"


def call_get_config(module, variant: str | None, path: Path) -> ConfigDict:
    try:
        return module.get_config(variant)
    except Exception as e:  # noqa: BLE001 - the experiment's own code
        raise ConfigError(f"{path.name}:get_config({variant!r}) failed: {_where(e, path)}; fix "
                          f"the experiment file") from None



def list_experiment_files() -> list[Path]:
    return sorted(p for p in EXPERIMENTS_DIR.glob("*.py") if not p.name.startswith("_"))


def describe_experiments() -> list[tuple[str, str, dict[str, str]]]:
    """(file name, one-line description, {variant: description}) for every experiment."""
    out = []
    for path in list_experiment_files():
        module = import_experiment(path)
        doc = (module.__doc__ or "").strip().splitlines()
        out.append((f"experiments/{path.name}", doc[0] if doc else "", dict(getattr(module, "VARIANTS", {}))))
    return out
