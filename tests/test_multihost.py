"""Multi-controller JAX for real: N processes on localhost through `scripts/launch_local.py`."""

import json
import subprocess
import sys

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
    assert sorted(ref) == list(range(1, 21))

    # 2 processes of 4 devices on fsdp=4 x data=2, stopped at step 10 (checkpointed
    # cooperatively), then resumed in 1 process on data=2 x tensor=4: the curve is the
    # 1-process data=8 run's throughout
    moved = tmp_path / "moved"
    p = launch(2, 4, "train", *ARGS, "--workdir", str(moved), "--config.mesh.fsdp=4",
               "--config.mesh.data=2", "--config.train.stop_at=10")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "process 1 of 2" in p.stdout + p.stderr
    two = losses(moved)
    assert sorted(two) == list(range(1, 11))
    diff = max(abs(two[s] - ref[s]) / ref[s] for s in two)
    print(f"2 processes vs 1: max relative loss difference {diff:.2e}")
    assert diff <= 1e-4
    data_files = sorted(f.name for f in (moved / "checkpoints" / "10" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    p = cli("train", *ARGS, "--workdir", str(moved), "--config.mesh.data=2", "--config.mesh.tensor=4")
    assert p.returncode == 0, p.stderr
    assert "resumed from step 10" in p.stderr
    resumed = losses(moved)
    assert sorted(resumed) == list(range(1, 21))
    diff = max(abs(resumed[s] - ref[s]) / ref[s] for s in range(11, 21))
    print(f"2-process checkpoint resumed in 1 process on data=2,tensor=4: max relative diff {diff:.2e}")
    assert diff <= 1e-4
    # goodput of the two runs in that workdir: one event log per process, merged
    assert sorted(f.name for f in (moved / "events").glob("*.jsonl")) == [
        "process_0.jsonl", "process_1.jsonl"]
    p = cli("goodput", str(moved), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["segments"] == 2 and report["redone_steps"] == 0
    total = report["productive_s"] + sum(report["badput_s"].values())
    assert abs(total - report["wall_s"]) <= 0.01 * report["wall_s"], report


def test_launcher_needs_a_command():
    p = subprocess.run([sys.executable, "scripts/launch_local.py", "--processes", "2"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "give the infra command after --" in p.stderr


def start_pair(workdir, *extra):
    """Two processes of one run, started directly (no launcher that could stop the survivor)."""
    import socket

    from tests.helpers import popen

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ("train", "--config", "experiments/lm.py:smoke", "--workdir", str(workdir),
            "--config.sharding.print_table=false", "--config.train.log_every=1",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2", *extra)
    return [popen(*args, f"--config.distributed.process_id={i}", env={"INFRA_CPU_DEVICES": "4"})
            for i in range(2)]


def wait_until_training(workdir, procs, timeout=240):
    import time

    deadline = time.time() + timeout
    while not (workdir / "metrics.jsonl").exists() or "train/loss" not in (workdir / "metrics.jsonl").read_text():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_killing_one_process_stops_the_other_quickly_and_clearly(tmp_path, victim):
    import signal
    import time

    procs = start_pair(tmp_path / "w", "--config.train.steps=100000")
    wait_until_training(tmp_path / "w", procs)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=120)
    waited = time.time() - killed
    procs[victim].wait()
    print(f"survivor exited {survivor.returncode} after {waited:.2f} s")
    assert survivor.returncode == 5
    assert waited < 60  # the default bound; in practice well under a second
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: process {1 - victim}: lost process {victim} of this 2-process run")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_checkpoint(tmp_path):
    import signal

    workdir = tmp_path / "w"
    procs = start_pair(workdir, "--config.train.steps=100000", "--config.checkpoint.every=1000")
    wait_until_training(workdir, procs)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs
    stops = {int(err.split("stopped at step ")[1].split()[0]) for _, err in outs}
    assert len(stops) == 1  # both processes agreed on the step
    (step,) = stops
    ckpt = workdir / "checkpoints" / str(step)
    assert (ckpt / "_CHECKPOINT_METADATA").exists()
    assert sorted(f.name for f in (ckpt / "data").glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
