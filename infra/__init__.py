"""A JAX/TPU-first training stack: mesh and sharding, a model-agnostic loop, Orbax checkpoints.

Importing `infra` neither imports JAX (so the CLI can set up emulated devices first) nor changes
anything process-wide: that is `infra.process.setup()`, which the CLI and `infra.train.run` call.
"""

__version__ = "0.1.0"
