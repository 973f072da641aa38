"""Is the hardware busy? FLOPs of the compiled step, the device's peak, MFU and memory.

MFU = (FLOPs per device per step, from XLA's cost analysis of the compiled step) / step time /
(peak FLOP/s per device). Peaks come from `infra.hardware` for TPUs and GPUs. On CPU the peak is
a measured float32 matmul, and emulated devices share that machine-wide figure equally.

One timing of a matmul says as much about the other processes on the machine at that moment as
about the machine, so the CPU peak is the best of several measurements, cached per machine in
`$INFRA_CACHE_DIR/cpu_matmul_peak.json` (default `~/.cache/infra`):

* a run measures (a few short matmuls, best taken) while the cache holds fewer than
  `MIN_SAMPLES` measurements, so the first runs on a machine each add one, taken at different
  moments; later runs read the cache and pay nothing;
* the cached figure is the highest measurement: a new one that exceeds it replaces it, together
  with its timestamp (a busy moment can only lower a timing, never raise it);
* measurements are kept for `MAX_AGE_S` (a day) from the first of them; after that the cache is
  stale and the next runs measure afresh (another jax version or machine starts afresh too);
* `remember_cpu_matmul_peak` folds in a measurement made elsewhere (`scripts/bench.py` times the
  matmul interleaved with the steps it compares).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from infra.hardware import detect_chip

MIN_SAMPLES = 3  # runs that measure before the cached best is trusted
MAX_AGE_S = 24 * 3600.0  # how long measurements stay valid
MATMUL_SIZE = 2048


def compiled_flops(compiled) -> float | None:
    """FLOPs per device of one call of a compiled SPMD program (XLA's count), or None.

    XLA counts a loop body once: with `model.scan_layers` or `train.microbatches > 1` this
    undercounts by the trip count.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def matmul_probe(size: int = MATMUL_SIZE) -> tuple[Callable[[], float], float]:
    """(run: one float32 size x size matmul on the first local device, returning its seconds;
    its FLOPs), compiled and warmed up, so callers can time it in their own schedule."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()

    def run() -> float:
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        return time.perf_counter() - t0

    return run, 2.0 * size**3


def measure_cpu_matmul_peak(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this machine (all cores), measured now."""
    run, flops = matmul_probe(size)
    return flops / min(run() for _ in range(repeats))


def cache_path() -> Path:
    """Where the CPU peak is cached (read at call time, so tests can redirect it)."""
    root = os.environ.get("INFRA_CACHE_DIR") or Path.home() / ".cache" / "infra"
    return Path(root) / "cpu_matmul_peak.json"


def _machine_key() -> str:
    return f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|jax {jax.__version__}"


def _read_entry(now: float) -> dict | None:
    """This machine's cached measurements, or None when absent, unreadable or stale."""
    try:
        entry = json.loads(cache_path().read_text())
        fresh = now - float(entry["since"]) <= MAX_AGE_S
        if entry["key"] == _machine_key() and fresh and float(entry["flops_per_sec"]) > 0:
            return entry
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_entry(entry: dict) -> None:
    """Replace the cache atomically: concurrent runs may each write, none sees half a file."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def _fold(entry: dict | None, flops_per_sec: float, now: float) -> dict:
    """The cache entry after one more measurement: the best so far, with when it was made."""
    if entry is None:
        entry = {"key": _machine_key(), "since": now, "samples": 0, "flops_per_sec": 0.0}
    entry = {**entry, "samples": int(entry["samples"]) + 1}
    if flops_per_sec > float(entry["flops_per_sec"]):
        entry |= {"flops_per_sec": flops_per_sec, "measured_at": now}
    return entry


def remember_cpu_matmul_peak(flops_per_sec: float, now: float | None = None) -> float:
    """Fold a matmul FLOP/s measured on this machine into the cache; returns the cached best."""
    now = time.time() if now is None else now
    entry = _fold(_read_entry(now), flops_per_sec, now)
    _write_entry(entry)
    return float(entry["flops_per_sec"])


def cpu_matmul_peak(measure: Callable[[], float] = measure_cpu_matmul_peak,
                    now: float | None = None) -> float:
    """The machine's matmul peak: the cached best, after measuring while fewer than
    `MIN_SAMPLES` fresh measurements are cached (the policy is in the module docstring)."""
    now = time.time() if now is None else now
    entry = _read_entry(now)
    if entry is not None and int(entry["samples"]) >= MIN_SAMPLES:
        return float(entry["flops_per_sec"])
    return remember_cpu_matmul_peak(measure(), now)


def peak_flops_per_device() -> tuple[float | None, str]:
    """(peak FLOP/s of one local device, where the figure comes from)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return cpu_matmul_peak() / jax.local_device_count(), "measured CPU matmul peak"

    chip = detect_chip()
    if chip is None:
        return None, f"no peak known for '{device.device_kind}'"
    return chip.peak_flops, f"{chip.name} bf16 peak"


def peak_host_memory_bytes() -> int:
    """The process's peak resident host memory so far (`getrusage`'s maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device, where the backend reports it (not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return (stats or {}).get("peak_bytes_in_use")
