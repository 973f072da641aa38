"""glibc malloc settings for XLA:CPU (infra/host_malloc.py): when they apply, and that they stop
XLA's per-step scratch block from being page-faulted back in on every call."""

import os
import subprocess
import sys

import pytest

from infra import host_malloc
from tests.helpers import ROOT

PROBE = """
import resource, infra.host_malloc as hm, infra.process
infra.process.setup()  # what the CLI and train.run do first
import jax, jax.numpy as jnp
x, w = jnp.ones((8192, 2048)), jnp.ones((2048, 8))
f = jax.jit(lambda x, w: (jnp.sin(x) * jnp.cos(x)[::-1]) @ w).lower(x, w).compile()
assert f.memory_analysis().temp_size_in_bytes >= 64 * 2**20  # above glibc's mmap ceiling (32 MiB)
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
settled = sorted(faults[10:])  # the heap settles after a few calls (more on a loaded machine)
print(hm.applied, settled[len(settled) // 2])  # the median call once settled
"""


def probe(setting: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env |= {"JAX_PLATFORMS": "cpu", host_malloc.ENV: setting, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_scratch_memory_is_not_faulted_back_in_every_call():
    on, faults_on = probe("1")
    off, faults_off = probe("0")
    assert on and not off
    # 64 MiB of scratch is 16,384 pages: without the settings every call faults them all in;
    # with them a typical call reuses the pages already mapped.
    assert faults_off > 10_000
    assert faults_on < 1_000


@pytest.mark.parametrize("env,want", [
    ({}, None),  # decided by the installed plugins
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "tpu,cpu"}, False),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"JAX_PLATFORMS": "cpu", "INFRA_CPU_MALLOC": "0"}, False),
    ({"JAX_PLATFORMS": "cuda", "INFRA_CPU_MALLOC": "1"}, True),
    ({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"}, False),
    ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False),
    ({"JAX_PLATFORMS": "cpu", "LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, False),
    ({"JAX_PLATFORMS": "cpu", "INFRA_CPU_MALLOC": "yes"}, False),
])
def test_when_the_settings_apply(env, want):
    ok, why = host_malloc.wanted(env)
    if want is None:
        assert ok == (not host_malloc._accelerator_plugins()), why
    else:
        assert ok == want, why
    assert why
