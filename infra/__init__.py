"""A JAX/TPU-first training stack: mesh and sharding, a model-agnostic loop, Orbax checkpoints.

Importing `infra` does not import JAX, so the CLI can set up emulated devices first.
"""

__version__ = "0.1.0"
