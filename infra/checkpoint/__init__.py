"""Checkpoints: the run's manager (save / restore / fallback / preemption), the read-only
parameter loader, verification, and the on-disk layout.

| module | job |
|---|---|
| `manager.py` | `Checkpointer`: async saves, keep-N, restore the newest intact step, fall back |
| `params.py` | `restore_params(workdir, abstract_params, step=None)`: parameters only, read-only |
| `newest.py` | `newest_intact`: the newest step whose read succeeds (corrupt ones to the caller) |
| `verify.py` | checksums of every array, saved array specs, what counts as corruption |
| `layout.py` | where checkpoints live in a workdir; committed steps; metadata |
| `orbax_handlers.py` | our Orbax handlers (the one file that uses Orbax internals) |
"""

from infra.checkpoint.layout import committed_steps
from infra.checkpoint.manager import Checkpointer
from infra.checkpoint.params import restore_params
from infra.checkpoint.verify import Corrupt, fingerprint, read_fingerprint

__all__ = ["Checkpointer", "Corrupt", "committed_steps", "fingerprint", "read_fingerprint",
           "restore_params"]
