"""Keep XLA:CPU's per-step scratch memory mapped between steps (glibc malloc settings).

XLA:CPU allocates each step's temporaries as one block (877 MB for the benchmark GPT) and frees
it at the end of the step. glibc serves blocks that large with ``mmap`` and returns them with
``munmap`` (always above 32 MB, and always from the per-thread arenas XLA's threads use), so
every step page-faults the whole block back in: 220,000 faults and 0.43 s of kernel time per
1.4 s step, where PyTorch's eager step on the same machine takes 1,400 faults.

``configure()`` makes glibc keep such memory: one malloc arena (XLA's threads allocate from
the main heap), no ``mmap`` for large blocks, and no trimming of the heap top. Measured on the
benchmark GPT (2-core VM): faults per step 190,000 -> 0 on most steps, step 1.49 s -> 1.31 s.
The cost is resident memory: freed memory stays with the process and the heap settles at about
two scratch blocks (RSS 2.9 GB instead of 1.5 GB there). ``infra.process.setup`` runs it (the CLI
first thing, before JAX starts its threads; ``infra.train.run`` for notebooks), and it applies
only where JAX will run on CPU: ``JAX_PLATFORMS`` names only ``cpu``, or no TPU / GPU
plugin is installed. ``INFRA_CPU_MALLOC=0`` turns it off, ``=1`` forces it on; it is also left
alone when the user has chosen malloc settings (``MALLOC_*`` or ``GLIBC_TUNABLES``) or a
different allocator (``LD_PRELOAD``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

ENV = "INFRA_CPU_MALLOC"
# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

applied = False  # whether configure() changed the settings in this process


def _accelerator_plugins() -> list[str]:
    """Installed JAX plugins for TPU / GPU (found without importing them)."""
    found = ["libtpu"] if importlib.util.find_spec("libtpu") else []
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    return found


def wanted(environ=os.environ) -> tuple[bool, str]:
    """(whether to apply, why) for this environment."""
    choice = environ.get(ENV, "")
    if choice not in ("", "0", "1"):
        return False, f"{ENV}={choice!r} is not 0 or 1; left malloc alone"
    if choice == "0":
        return False, f"{ENV}=0"
    if choice == "1":
        return True, f"{ENV}=1"
    user = [k for k in environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    if user or "malloc" in environ.get("LD_PRELOAD", ""):
        return False, "the user chose malloc settings (" + ", ".join(user or ["LD_PRELOAD"]) + ")"
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"], f"JAX_PLATFORMS={','.join(platforms)}"
    plugins = _accelerator_plugins()
    if plugins:
        return False, f"accelerator plugins installed: {', '.join(plugins)}"
    return True, "no TPU / GPU plugin installed: JAX runs on CPU"


def configure(environ=os.environ) -> bool:
    """Apply the malloc settings where ``wanted``; True when they are now in effect."""
    global applied
    ok, _ = wanted(environ)
    if not ok or applied or not sys.platform.startswith("linux"):
        return applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt parameters like these
    except (OSError, AttributeError):
        return False
    applied = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
    return applied


def release() -> None:
    """Return the freed memory the settings above keep to the system (glibc `malloc_trim`):
    called after the rare phases that allocate and free much more than a step does (compiling,
    restoring, evaluating), so their memory does not stay resident for the rest of the run.
    A step's own scratch memory is kept between steps as before."""
    if applied:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
