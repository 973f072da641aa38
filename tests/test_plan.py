"""The scale planner: exact per-device state bytes, figures checked against the compiled step,
the hardware table, and bad input."""

import json
import os
import subprocess
import sys

import pytest

from infra import config, hardware, plan
from infra.errors import ConfigError
from infra.plan.estimate import Topology
from tests.helpers import ROOT

SMOKE = "experiments/lm.py:smoke"


def _run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "INFRA_CPU_DEVICES")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_8b_on_256_emulated_devices():
    """What users run: 256 emulated CPU devices, Llama-8B shape, FSDP over all of them."""
    code = """
import json, sys
from infra import mesh
mesh.emulate_cpu_devices(256)
from infra import cli, config, plan
rc = cli.main(["plan", "--config", "experiments/lm.py:8b", "--devices", "256", "--mesh", "fsdp=256",
               "--chip", "tpu-v5p", "--price", "4.2"])
p = plan.plan(config.load("experiments/lm.py:8b"), devices=256, mesh="fsdp=256", chip="v5p",
              price_per_chip_hour=4.2)
print("JSON" + json.dumps(p.to_dict(), default=str))
sys.exit(rc)
"""
    proc = _run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table, _, payload = proc.stdout.partition("JSON")
    d = json.loads(payload)
    assert d["mesh"] == {"data": 1, "stage": 1, "fsdp": 256, "sequence": 1, "expert": 1,
                         "tensor": 1}
    assert d["param_count"] > 6e9 and d["compiled"] is None  # too big to compile by default
    whole = d["params_bytes_total"] + d["opt_bytes_total"]
    per_device = d["params_bytes"] + d["opt_bytes"]
    assert abs(per_device - whole / 256) <= 0.10 * whole / 256
    assert d["grads_bytes"] == d["params_bytes"]
    assert d["flops_label"] == "estimate" and d["flops_per_device"] > 1e14
    assert d["step_s"] > 0 and 0 < d["efficiency"] <= 1 and d["cost_per_1b"] > 0
    assert d["cost_per_1b"] == pytest.approx(4.2 * 256 * 1e9 / d["units_per_s"] / 3600)
    for text in ("exact (abstract state)", "estimate", "cost per 1B tokens at $4.2/chip-hour",
                 "scaling efficiency", "HBM"):
        assert text in table
    assert "fits" in table  # "fits" or "does NOT fit (...)"


@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_plan_agrees_with_the_compiled_step(mesh):
    """...for a config meant for TPUs too (splash attention): the emulated devices compile xla
    attention, whose FLOPs XLA counts (the run's MFU meter adds the kernel's the same way)."""
    cfg = config.load(SMOKE, {"model.attention": "splash"})
    p = plan.plan(cfg, devices=8, mesh=mesh, chip="h100", price_per_chip_hour=2.0, compile=True)
    cp = p.compiled
    assert cp is not None and p.flops_label == plan.MEASURED
    # The compiled step's arguments are the train state and the batch, per device.
    expected = p.params_bytes + p.opt_bytes + p.batch_bytes
    assert abs(cp.argument_bytes - expected) <= 0.10 * expected
    # XLA CPU cost analysis reports the FLOPs of the SPMD-partitioned program, i.e. per device:
    # the analytic per-device figure (total / 8) matches it.
    assert p.analytic_flops_per_device == pytest.approx(cp.flops, rel=0.25)
    # Collective bytes: the analytic model against the compiled HLO (the CPU program all-reduces
    # gradients where TPU/GPU reduce-scatter), within a factor of 2.
    assert 0.5 < p.collective_ici_bytes / cp.collective_bytes < 2
    text = plan.format_plan(p)
    assert "measured (XLA)" in text and "exact (abstract state)" in text
    assert any("compiled with model.attention=xla" in n for n in p.notes)


def test_parallelism_and_memory_switches():
    base = plan.plan(config.load(SMOKE), devices=8, mesh="fsdp=4,dcn_data=2", chip="tpu-v5p",
                     compile=False)
    assert base.dcn == {"data": 2, "stage": 1, "fsdp": 1, "sequence": 1, "expert": 1,
                        "tensor": 1}
    by_what = {(c.what.split(" (")[0], c.axes): c for c in base.collectives}
    gather = by_what[("all-gather weights, fwd + bwd", ("fsdp",))]
    assert gather.ici_bytes > 0 and gather.dcn_bytes == 0
    allreduce = by_what[("all-reduce gradients", ("data",))]
    assert allreduce.ici_bytes == 0 and allreduce.dcn_bytes > 0  # across the two slices
    remat = plan.plan(config.load(SMOKE, {"model.remat": "full"}), devices=8, mesh="fsdp=8",
                      compile=False)
    none = plan.plan(config.load(SMOKE), devices=8, mesh="fsdp=8", compile=False)
    assert remat.activation_bytes < none.activation_bytes
    assert remat.analytic_flops_per_device > none.analytic_flops_per_device
    assert remat.model_flops_per_device == none.model_flops_per_device
    micro = plan.plan(config.load(SMOKE, {"train.microbatches": 2}), devices=8, mesh="fsdp=8",
                      compile=False)
    assert micro.activation_bytes < none.activation_bytes
    assert micro.grads_bytes == 2 * micro.params_bytes  # the accumulator
    blocked = plan.plan(config.load(SMOKE, {"model.loss_blocks": 4}), devices=8, mesh="fsdp=8",
                        compile=False)
    assert blocked.activation_bytes < none.activation_bytes  # a quarter of the logits at once


def test_gpu_collectives_beyond_a_node_cross_the_network():
    chip = hardware.get_chip("h100")
    ici = {"data": 1, "stage": 1, "fsdp": 256, "sequence": 1, "expert": 1,
           "tensor": 1}
    dcn = dict.fromkeys(ici, 1)
    topo = Topology(list(ici), ici, dcn, chip)
    on_ici, on_dcn = topo.split(("fsdp",), 1.0)
    assert on_ici == pytest.approx(7 / 8)  # within the 8-GPU NVLink node
    assert on_dcn == pytest.approx(31 / 32 / 8)  # 1/8 of the inter-node share per GPU
    assert topo.split(("fsdp",), 1.0, reduce=True) == (2 * on_ici, 2 * on_dcn)
    flat = Topology(list(ici), ici, dcn, None).split(("fsdp",), 1.0)
    assert flat == (pytest.approx(255 / 256), 0)


def test_hlo_collective_parser():
    hlo = "\n".join([
        "  %ag = f32[64,128]{1,0} all-gather(%p), channel_id=1, replica_groups=mesh['axis_0'=8,"
        "'axis_1'=1] {'axis_0'}, dimensions={0}",
        "  %ar = (f32[], f32[4,64]{1,0}) all-reduce(%a, %b), replica_groups=[4,2]<=[8], to_apply=%add",
        "  %rs = bf16[16]{0} reduce-scatter(%c), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}",
        "  %cp = f32[10]{0} collective-permute(%d), source_target_pairs={{0,1},{1,0}}",
        "  %x = f32[10]{0} add(%d, %d)",
    ])
    total, counts = plan.hlo_collective_bytes(hlo, 8)
    assert counts == {"all-gather": 1, "all-reduce": 1, "reduce-scatter": 1, "collective-permute": 1}
    expected = 64 * 128 * 4 * 7 / 8 + 2 * (4 + 4 * 64 * 4) * 1 / 2 + 16 * 2 * 3 + 40
    assert total == pytest.approx(expected)


def test_hardware_table():
    for name, chip in hardware.CHIPS.items():
        assert chip.peak_flops > 1e14 and chip.hbm_bytes > 1e10 and chip.ici_bw > chip.dcn_bw > 0
        assert chip.sources and all(s.startswith("https://") for s in chip.sources)
        assert hardware.get_chip(name.upper()) is chip
    assert hardware.get_chip("v5p").name == "tpu-v5p"
    assert hardware.get_chip("H100").name == "h100-sxm"
    kinds = {"TPU v4": "tpu-v4", "TPU v5 lite": "tpu-v5e", "TPU v5": "tpu-v5p", "TPU v5p": "tpu-v5p",
             "TPU v6 lite": "tpu-v6e", "NVIDIA A100-SXM4-80GB": "a100-80gb",
             "NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H200": "h200"}
    for kind, name in kinds.items():
        assert hardware.chip_for_device_kind(kind).name == name, kind
    assert hardware.chip_for_device_kind("cpu") is None
    assert hardware.detect_chip() is None  # the tests run on CPU devices


def test_unknown_chip_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown chip 'tpu-v9'; known chips: tpu-v4, .*h200"):
        hardware.get_chip("tpu-v9")
    proc = _run_python("-m", "infra", "plan", "--config", SMOKE, "--devices", "8",
                       "--chip", "tpu-v9")
    rc, err = proc.returncode, proc.stderr
    assert rc == 2 and err.startswith("error: unknown chip") and err.count("\n") == 1


def test_importing_the_planner_starts_no_jax():
    """`infra.cli` adds the `plan` arguments before it emulates the CPU devices."""
    proc = _run_python("-c", "import sys, infra.plan; print('jax' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-3000:]


def test_mesh_must_match_devices():
    cfg = config.load(SMOKE)
    with pytest.raises(ConfigError, match="needs 4 devices but 8 are available"):
        plan.plan(cfg, devices=8, mesh="fsdp=4")
    with pytest.raises(ConfigError, match="unknown mesh axis 'fdsp'"):
        plan.plan(cfg, devices=8, mesh="fdsp=8")
    with pytest.raises(ConfigError, match="needs 16 JAX devices but there are 8"):
        plan.plan(cfg, devices=16, mesh="fsdp=16")
