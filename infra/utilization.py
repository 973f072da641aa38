"""Is the hardware busy? FLOPs of the compiled step, the device's peak, MFU and memory.

MFU = (FLOPs per device per step, from XLA's cost analysis of the compiled step) / step time /
(peak FLOP/s per device). Peaks come from `infra.hardware` for TPUs and GPUs; on CPU a float32
matmul is timed once and cached in `~/.cache/infra/cpu_matmul_peak.json`, and emulated devices
share that machine-wide figure equally.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

CACHE = Path(os.environ.get("INFRA_CACHE_DIR", Path.home() / ".cache" / "infra")) / "cpu_matmul_peak.json"


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


def measure_cpu_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this machine (all cores), measured now."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def cpu_matmul_peak() -> float:
    """The machine's measured matmul peak, from the cache when it was measured here before."""
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|jax {jax.__version__}"
    try:
        cached = json.loads(CACHE.read_text())
        if cached.get("key") == key:
            return float(cached["flops_per_sec"])
    except (OSError, ValueError, KeyError):
        pass
    peak = measure_cpu_matmul_peak()
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps({"key": key, "flops_per_sec": peak}))
    except OSError:
        pass
    return peak


def peak_flops_per_device() -> tuple[float | None, str]:
    """(peak FLOP/s of one local device, where the figure comes from)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return cpu_matmul_peak() / jax.local_device_count(), "measured CPU matmul peak"
    from infra.hardware import detect_chip

    chip = detect_chip()
    if chip is None:
        return None, f"no peak known for '{device.device_kind}'"
    return chip.peak_flops, f"{chip.name} bf16 peak"


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device, where the backend reports it (not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return (stats or {}).get("peak_bytes_in_use")
