"""Goodput: how much of a workdir's wall time trained the model (infra/goodput.py), from the
event log runs append (infra/events.py)."""

import json
import signal

import pytest

from infra.events import EventLog, read_events
from infra.goodput import compute
from tests.helpers import cli, kill_when, popen

SMOKE = "experiments/lm.py:smoke"


def _log(workdir, process, events):
    log = EventLog(workdir, process)
    for at, name, fields in events:
        log.record(name, at=at, **fields)
    log.close()


def test_the_arithmetic_on_a_known_timeline(tmp_path):
    """Run 1 starts at t=0 and is killed after logging step 13 (checkpoint at 10); run 2 starts
    at t=40, resumes from 10 and finishes at step 20."""
    _log(tmp_path, 0, [
        (0.0, "start", {}), (5.0, "restore", {"step": 0, "fresh": True, "seconds": 0.0}),
        (9.0, "compile", {"seconds": 3.0}), (9.0, "loop_start", {"step": 0}),
        (14.0, "steps", {"first": 1, "last": 5, "seconds": 5.0, "input_wait_s": 0.5}),
        (15.0, "eval", {"seconds": 1.0}),
        (20.0, "steps", {"first": 6, "last": 10, "seconds": 6.0, "input_wait_s": 0.0}),
        (20.5, "checkpoint_save", {"step": 10, "seconds": 0.5}),
        (23.5, "steps", {"first": 11, "last": 13, "seconds": 3.5, "input_wait_s": 0.0}),
    ])
    _log(tmp_path, 0, [
        (40.0, "start", {}), (44.0, "restore", {"step": 10, "fresh": False, "seconds": 2.0}),
        (47.0, "compile", {"seconds": 3.0}), (47.0, "loop_start", {"step": 10}),
        (57.0, "steps", {"first": 11, "last": 20, "seconds": 10.0, "input_wait_s": 1.0}),
        (58.0, "checkpoint_wait", {"seconds": 1.0}), (58.5, "exit", {"reason": "finished"}),
    ])
    report = compute(tmp_path)
    b = report["badput_s"]
    assert report["wall_s"] == 58.5 and report["segments"] == 2
    assert report["redone_steps"] == 3  # steps 11-13 trained again by run 2
    # run 1: 4.5 + 5 (6 s less the 1 s eval) kept, 3 s of steps 11-13 lost; run 2: 9 s kept
    assert report["productive_s"] == pytest.approx(4.5 + 5.0 + 9.0)
    assert b["lost_work"] == pytest.approx(3.0)
    assert b["compile"] == 6.0 and b["restore"] == 2.0 and b["eval"] == 1.0
    assert b["checkpoint"] == pytest.approx(1.5) and b["input_wait"] == pytest.approx(1.5)
    assert b["start_up"] == pytest.approx((9 - 0 - 3) + (47 - 40 - 2 - 3))
    assert b["idle"] == pytest.approx(40.0 - 23.5)
    total = report["productive_s"] + sum(b.values())
    assert total == pytest.approx(report["wall_s"])


def _assert_adds_up(report):
    total = report["productive_s"] + sum(report["badput_s"].values())
    assert abs(total - report["wall_s"]) <= 0.01 * report["wall_s"], report
    assert 0 < report["goodput"] < 1


def _goodput(workdir):
    p = cli("goodput", str(workdir), "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.slow
def test_a_killed_and_a_preempted_run_are_accounted_exactly(tmp_path):
    args = ("--config", SMOKE, "--config.sharding.print_table=false", "--config.train.steps=40",
            "--config.train.log_every=1", "--config.checkpoint.every=5")
    killed = tmp_path / "killed"
    proc = popen("train", *args, "--workdir", str(killed))
    kill_when(lambda: (killed / "metrics.jsonl").exists()
              and '"step": 13,' in (killed / "metrics.jsonl").read_text(), proc, poll=0.005)
    logged = max(e["last"] for e in read_events(killed) if e["event"] == "steps")
    p = cli("train", *args, "--workdir", str(killed))
    assert p.returncode == 0, p.stderr
    resumed = next(e["step"] for e in read_events(killed) if e["event"] == "restore"
                   and not e["fresh"])
    assert resumed % 5 == 0 and resumed <= logged
    report = _goodput(killed)
    assert report["segments"] == 2
    assert report["redone_steps"] == logged - resumed  # exactly the steps trained twice
    assert report["badput_s"]["lost_work"] > 0
    _assert_adds_up(report)

    preempted = tmp_path / "preempted"
    proc = popen("train", *args, "--workdir", str(preempted))
    while not (preempted / "metrics.jsonl").exists() or '"step": 8,' not in (
            preempted / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    assert cli("train", *args, "--workdir", str(preempted)).returncode == 0
    report = _goodput(preempted)
    assert report["segments"] == 2 and report["redone_steps"] == 0  # nothing lost
    assert report["badput_s"]["lost_work"] == 0
    _assert_adds_up(report)

    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(preempted / "tensorboard"))
    acc.Reload()
    assert "goodput/goodput" in acc.Tags()["scalars"]
    assert acc.Scalars("goodput/goodput")[-1].value == pytest.approx(report["goodput"], rel=0.05)


@pytest.mark.slow
def test_start_up_counts_from_the_program_not_from_what_ran_before_exec(tmp_path):
    """A launcher's shell that `exec`s Python passes on its process (and its start time): the
    3 s it spent before (a `pip install`, here a sleep) are not the run's start-up."""
    import os
    import shlex
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    workdir = tmp_path / "w"
    train = shlex.join([sys.executable, "-m", "infra", "train", "--config", SMOKE, "--workdir",
                        str(workdir), "--config.sharding.print_table=false",
                        "--config.train.steps=2", "--config.checkpoint.every=2"])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"INFRA_CPU_DEVICES": "1"}
    launched = time.time()
    p = subprocess.run(["bash", "-c", f"sleep 3 && exec {train}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (start,) = [e for e in read_events(workdir) if e["event"] == "start"]
    assert start["time"] >= launched + 3, (start["time"] - launched)
    assert _goodput(workdir)["badput_s"]["start_up"] < time.time() - launched - 3


def test_a_workdir_without_events_is_one_line(tmp_path):
    p = cli("goodput", str(tmp_path))
    assert p.returncode == 2 and "no event log" in p.stderr
