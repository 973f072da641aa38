"""Multi-controller JAX for real: N processes on localhost through `scripts/launch_local.py`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, cli

ARGS = ("--config", "experiments/lm.py:smoke", "--config.train.steps=20", "--config.train.log_every=1",
        "--config.train.eval_every=10", "--config.checkpoint.every=10", "--config.sharding.print_table=false")


def losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def launch(processes, devices, *infra_args, timeout=300):
    return subprocess.run(
        [sys.executable, "scripts/launch_local.py", "--processes", str(processes),
         "--devices-per-process", str(devices), "--", *infra_args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one_on_another_mesh(tmp_path):
    one = tmp_path / "one"
    p = cli("train", *ARGS, "--workdir", str(one), "--config.mesh.data=8")
    assert p.returncode == 0, p.stderr
    ref = losses(one)

    two = tmp_path / "two"
    p = launch(2, 4, "train", *ARGS, "--workdir", str(two), "--config.mesh.data=8")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "process 1 of 2" in p.stdout + p.stderr
    got = losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    diff = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    print(f"2 processes vs 1: max relative loss difference {diff:.2e}")
    assert diff <= 1e-4

    # stop a 2-process run at step 10 (checkpointed cooperatively), resume it in 1 process
    # on a different mesh: the curve continues as if nothing happened
    moved = tmp_path / "moved"
    p = launch(2, 4, "train", *ARGS, "--workdir", str(moved), "--config.mesh.fsdp=4",
               "--config.mesh.data=2", "--config.train.stop_at=10")
    assert p.returncode == 0, p.stdout + p.stderr
    data_files = sorted(f.name for f in (moved / "checkpoints" / "10" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    p = cli("train", *ARGS, "--workdir", str(moved), "--config.mesh.data=2", "--config.mesh.tensor=4")
    assert p.returncode == 0, p.stderr
    assert "resumed from step 10" in p.stderr
    resumed = losses(moved)
    assert sorted(resumed) == list(range(1, 21))
    diff = max(abs(resumed[s] - ref[s]) / ref[s] for s in ref)
    print(f"2-process checkpoint resumed in 1 process on data=2,tensor=4: max relative diff {diff:.2e}")
    assert diff <= 1e-4
    np.testing.assert_allclose(
        [resumed[s] for s in range(11, 21)], [ref[s] for s in range(11, 21)], rtol=1e-4)


def test_launcher_needs_a_command():
    p = subprocess.run([sys.executable, "scripts/launch_local.py", "--processes", "2"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "give the infra command after --" in p.stderr
