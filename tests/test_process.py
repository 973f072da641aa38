"""Importing infra changes nothing process-wide; `infra.process.setup` is the one place that does."""

import subprocess
import sys

from tests.helpers import ROOT

PROBE = """
import logging, sys
import jax, flax, grain, orbax.checkpoint, tqdm  # what the libraries do on import
hook, unraisable = sys.excepthook, sys.unraisablehook
handlers = list(logging.getLogger().handlers)
import infra, infra.train, infra.checkpoint, infra.generate, infra.plan, infra.cli, infra.evaluate
from infra import host_malloc
changed = [name for name, bad in [
    ("malloc", host_malloc.applied),
    ("absl log filters", bool(logging.getLogger("absl").filters)),
    ("excepthook", sys.excepthook is not hook),
    ("unraisablehook", sys.unraisablehook is not unraisable),
    ("root logging", logging.getLogger().handlers != handlers),
] if bad]
print("import changed:", changed)
from infra import process
process.setup(cli=True)
print("setup:", host_malloc.applied, bool(logging.getLogger("absl").filters),
      sys.excepthook is not hook)
"""


def test_import_changes_nothing_and_setup_does():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "import changed: []", out.stdout
    assert lines[1] == "setup: True True True", out.stdout
