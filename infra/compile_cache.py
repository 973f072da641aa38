"""JAX's persistent compilation cache: a second `train`, `eval`, `generate` or `serve` of the same
program loads what the first compiled instead of compiling it again.

Where it lives: `--compile_cache DIR` (a CLI flag before the command), else the environment
variable `INFRA_COMPILE_CACHE`, else `$INFRA_CACHE_DIR/jax` or `~/.cache/infra/jax`. `off` (flag
or variable) disables it. JAX keys each entry by the program, the devices and the compiler
options, so a changed model, mesh or JAX version compiles anew. Every program is written (no
minimum compile time): a second start then compiles nothing, which `stats()` shows (`generate
--json` reports it). A directory that cannot be created or written is a warning, not a failure:
the run compiles.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "INFRA_COMPILE_CACHE"
OFF = ("off", "none", "0", "false")
_stats = {"hits": 0, "writes": 0}
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "writes"}  # JAX records a miss as it writes


def default_directory() -> Path:
    base = os.environ.get("INFRA_CACHE_DIR") or Path.home() / ".cache" / "infra"
    return Path(base).expanduser() / "jax"


def resolve(flag: str | None = None) -> Path | None:
    """The cache directory that `flag` (the CLI's `--compile_cache`), the environment or the
    default names; None when disabled."""
    value = flag if flag is not None else os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    return Path(value).expanduser() if value else default_directory()


def enable(flag: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `resolve(flag)` (before anything compiles).
    Returns the directory in use, None when disabled or not writable."""
    import jax

    directory = resolve(flag)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        log.warning("warning: compilation cache %s is not writable (%s); compiling without it "
                    "(set %s or --compile_cache to another directory, or off)", directory,
                    e.strerror or type(e).__name__, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX otherwise puts XLA's GPU autotuning cache inside this directory, which writes the
    # directory's path into every program's compile options, hence its cache key: a cache
    # copied or moved (into a container image, to another machine) would never be found
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    if not _stats.get("listening"):
        jax.monitoring.register_event_listener(_count)
        _stats["listening"] = True
    return directory


def _count(event: str, **_) -> None:
    if event in _EVENTS:
        _stats[_EVENTS[event]] += 1


def stats() -> dict[str, int]:
    """{"hits": programs loaded from the cache, "writes": programs compiled and written} in
    this process since `enable`."""
    return {"hits": _stats["hits"], "writes": _stats["writes"]}
