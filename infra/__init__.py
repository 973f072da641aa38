"""A JAX/TPU-first training stack: mesh and sharding, a model-agnostic loop, Orbax checkpoints.

Importing `infra` does not import JAX, so the CLI can set up emulated devices first. It does
set glibc's malloc up for XLA:CPU when JAX will run on CPU (`infra.host_malloc`), which must
happen before JAX starts its threads.
"""

from infra import host_malloc

host_malloc.configure()

__version__ = "0.1.0"
