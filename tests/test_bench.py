"""`scripts/bench.py --quick` runs end to end and reports every section with positive numbers.

The figures are not checked against their targets: they depend on the machine and its load.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _positive(section: dict, *keys: str) -> None:
    for key in keys:
        value = section[key]
        assert isinstance(value, (int, float)) and value > 0, (key, value)


@pytest.mark.slow
def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out),
         "--tmpdir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "met?" in proc.stdout  # the table was printed
    r = json.loads(out.read_text())

    assert r["quick"] is True and r["machine"]["cpu_count"] > 0 and r["machine"]["jax"]
    assert r["machine"]["devices"] == 1
    _positive(r["a_overhead"], "ours_step_s", "plain_step_s", "ours_tokens_per_s",
              "plain_tokens_per_s", "overhead_ratio")
    _positive(r["b_throughput"], "ours_tokens_per_s", "nnx_tokens_per_s", "ours_over_nnx")
    assert "tokens_per_s" in r["b_torch"] or r["b_torch"]["skipped"]
    _positive(r["c_mfu"], "flops_per_step_per_device", "achieved_flops_per_s",
              "peak_flops_per_s_per_device", "mfu")
    _positive(r["d_checkpoint"], "state_bytes", "sync_save_s", "save_mb_per_s",
              "disk_write_mb_per_s", "sync_blocking_s", "async_blocking_s", "blocking_fraction")
    _positive(r["e_data"], "iterator_batches_per_s", "step_batches_per_s", "supply_over_demand",
              "input_wait_fraction")
    assert len(r["table"]) >= 8
    # ours and the plain step train the same model from the same start on the same batches
    last = r["a_overhead"]["last_loss"]
    assert abs(last["ours"] - last["plain"]) < 1e-3, last
    assert 0 < r["b_throughput"]["nnx_last_loss"] < 10


def test_bench_gpu_quick_runs_on_cpu(tmp_path):
    """`scripts/bench_gpu.py --quick`: a JSON line per figure, every one measured and positive
    (float, then fp8 quantization-aware); without --quick on CPU, one line and exit 1."""
    out = tmp_path / "bench_gpu.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = str(ROOT / "scripts" / "bench_gpu.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    step = [x for x in lines if x["figure"] == "train_step"]
    assert [(x["attention"], x["quantization"]) for x in step] == [("xla", "none"),
                                                                   ("xla", "fp8")]
    for line in step:
        _positive(line, "step_s", "compile_s", "tokens_per_s", "xla_flops_per_step", "params")
    proc = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "no GPU or TPU found (JAX sees cpu)" in proc.stderr
