"""The streaming load's host memory stays near one tensor, not the model (a 250 MB checkpoint).

Measured in a fresh process by scripts/bench_interop.py: before each tensor the kernel's
peak-RSS mark is reset (/proc/self/clear_refs) and after it the peak above the RSS before it,
less the tensor's own device buffers (on CPU they are host memory, and they are the model), is
the tensor's transient memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs /proc/self/clear_refs (Linux) to reset the peak RSS")
def test_streaming_load_peak_memory_is_about_one_tensor(tmp_path):
    out = tmp_path / "load.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "scripts/bench_interop.py", "--only", "load",
                        "--size_mb", "250", "--devices", "8", "--tmp", str(tmp_path),
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(out.read_text())["load"]
    for name in ("load_1dev_warm", "load_8dev_warm"):
        r = results[name]
        assert r["file_bytes"] >= 200 * 2**20
        assert r["params_bytes_on_devices"] >= r["file_bytes"] * 0.99  # everything was loaded
        assert r["largest_tensor_bytes"] * 4 < r["file_bytes"]  # one tensor << the model
        # the target: at most 2x the largest tensor
        assert r["peak_transient_bytes"] <= 2 * r["largest_tensor_bytes"], r
        print(f"\n{name}: model {r['file_bytes'] / 2**20:.0f} MiB, largest tensor "
              f"{r['largest_tensor_bytes'] / 2**20:.1f} MiB, peak transient "
              f"{r['peak_transient_bytes'] / 2**20:.1f} MiB, {r['bytes_per_s'] / 2**30:.2f} GiB/s")
