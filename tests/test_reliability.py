"""Nothing lost: bit-exact resume after kills, preemption, crash-safe and verified checkpoints,
numerical faults. Everything through the real CLI in subprocesses, checkpoints read back with
Orbax itself."""

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import ROOT, Position, cli, popen, wait_for

SMOKE = "experiments/lm.py:smoke"
RUN = ("--config", SMOKE, "--config.train.steps=60", "--config.train.log_every=1",
       "--config.train.eval_every=30", "--config.checkpoint.every=5", "--config.checkpoint.keep=3",
       "--config.sharding.print_table=false")

pytestmark = pytest.mark.slow


def train_losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def committed(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*")
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def saved_state(workdir, step):
    """The arrays of a checkpoint, read with Orbax alone (no infra code)."""
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def assert_bit_identical(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run. Its programs are in the session's compilation cache
    (tests/conftest.py) by the time the runs below start: they load them instead of compiling
    them again, so a test that starts many runs spends its time on them, not on XLA."""
    workdir = tmp_path_factory.mktemp("straight")
    p = cli("train", *RUN, "--workdir", str(workdir))
    assert p.returncode == 0, p.stderr
    return workdir


def test_sigkill_at_random_steps_resumes_bit_exactly(tmp_path, straight):
    rng = random.Random(int(os.environ.get("INFRA_TEST_SEED", "1234")))
    kill_steps = sorted(rng.sample(range(3, 57), 5))
    workdir = tmp_path / "killed"
    during_save = 0
    for i, kill_at in enumerate(kill_steps):
        proc = popen("train", *RUN, "--workdir", str(workdir))
        ckpts = workdir / "checkpoints"
        if i == 0:  # the first kill lands in the middle of an asynchronous save
            wait_for(lambda: any(".orbax-checkpoint-tmp" in p.name for p in ckpts.glob("*")), proc,
                     poll=0.005)
        else:
            wait_for(lambda: (workdir / "metrics.jsonl").exists()
                     and any(s >= kill_at for s, _ in train_losses(workdir)), proc)
        unfinished = [p.name for p in ckpts.glob("*") if "tmp" in p.name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        during_save += bool(unfinished)
    assert during_save >= 1, "no kill landed during an asynchronous save"

    p = cli("train", *RUN, "--workdir", str(workdir))
    assert p.returncode == 0, p.stderr
    assert not [p.name for p in (workdir / "checkpoints").glob("*") if "tmp" in p.name]
    assert train_losses(workdir) == train_losses(straight)  # bit-identical floats
    assert committed(workdir)[-1] == 60
    assert_bit_identical(saved_state(workdir, 60), saved_state(straight, 60))


def test_sigterm_writes_a_checkpoint_and_resumes_bit_exactly(tmp_path, straight):
    workdir = tmp_path / "term"
    proc = popen("train", *RUN, "--workdir", str(workdir))
    wait_for(lambda: (workdir / "metrics.jsonl").exists()
             and any(s >= 23 for s, _ in train_losses(workdir)), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    stopped = int(err.split("stopped at step ")[1].split()[0])
    assert 23 <= stopped < 60
    assert committed(workdir)[-1] == stopped  # written off the 5-step interval, and committed
    assert "run the same command to resume" in err.strip().splitlines()[-1]

    p = cli("train", *RUN, "--workdir", str(workdir))
    assert p.returncode == 0, p.stderr
    assert f"resumed from step {stopped}" in p.stderr
    assert train_losses(workdir) == train_losses(straight)
    assert_bit_identical(saved_state(workdir, 60), saved_state(straight, 60))


WRITER = """
import sys, jax, jax.numpy as jnp
from infra.checkpoint import Checkpointer
class It:
    def get_state(self): return {"next_index": 0}
ckpt = Checkpointer(sys.argv[1], every=1, keep=2, async_save=True)
step = (ckpt.latest_step() or 0)
while True:
    step += 1
    state = {"w": jnp.full((512, 1024), float(step)), "step": jnp.int32(step)}
    ckpt.save(step, state, It(), {})
    print("issued", step, flush=True)  # the test kills only once saving has begun
"""


def stdout_lines(proc) -> queue.Queue:
    """proc's stdout lines as they come, then None at its end (read on a thread)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_issued_saves(lines: queue.Queue, n: int, log: Path) -> None:
    for _ in range(n):
        try:
            line = lines.get(timeout=300)  # a hang guard, not a speed assumption
        except queue.Empty:
            line = "no line within 300 s"
        assert line and line.startswith("issued"), (line, log.read_text()[-3000:])


def test_sigkill_during_saves_never_loses_the_last_committed_checkpoint(tmp_path):
    from infra.checkpoint import Checkpointer

    class Iterator:
        def get_state(self):
            return {"next_index": 0}

        def set_state(self, state):
            pass

        def start_prefetch(self):
            pass

    workdir = tmp_path / "saves"
    rng = random.Random(99)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    for trial in range(20):
        log = tmp_path / f"writer-{trial}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(workdir)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        # Kill at a random moment after saving has begun, whatever the machine's speed: once the
        # writer has issued 1-4 saves (the third returns only after the first has committed),
        # plus up to half a second.
        try:
            wait_for_issued_saves(stdout_lines(proc), rng.randint(1, 4), log)
            time.sleep(rng.random() * 0.5)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        steps = committed(workdir)
        ckpt = Checkpointer(workdir, every=1, keep=2)
        import jax
        abstract = {"w": jax.ShapeDtypeStruct((512, 1024), np.float32),
                    "step": jax.ShapeDtypeStruct((), np.int32)}
        restored = ckpt.restore_latest(abstract, lambda step: Iterator())
        ckpt.close()
        if not steps:
            assert restored is None
            continue
        state, meta, _ = restored
        assert meta["step"] == steps[-1] == int(state["step"]), trial
        assert float(state["w"][0, 0]) == steps[-1] and float(state["w"][-1, -1]) == steps[-1]
        assert not [p for p in (workdir / "checkpoints").glob("*") if "tmp" in p.name]
    assert committed(workdir), "no save ever committed"


def _corrupt_newest(workdir, how):
    step = committed(workdir)[-1]
    files = [f for f in (workdir / "checkpoints" / str(step) / "state").rglob("*") if f.is_file()]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) // 3, len(data) // 3 + 8):
            data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return step


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_checkpoint_is_detected_and_falls_back(tmp_path, how):
    workdir = tmp_path / how
    args = ("--config", SMOKE, "--config.train.steps=20", "--config.checkpoint.every=10",
            "--config.sharding.print_table=false")
    assert cli("train", *args, "--workdir", str(workdir)).returncode == 0
    bad = _corrupt_newest(workdir, how)
    before = {f: f.read_bytes() for f in (workdir / "checkpoints").rglob("*") if f.is_file()}

    p = cli("train", *args, "--config.train.steps=30", "--config.checkpoint.fallback=false",
            "--workdir", str(workdir))
    assert p.returncode == 3, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert f"checkpoint step {bad} at {workdir.resolve() / 'checkpoints' / str(bad)} is corrupted" in lines[0]
    assert "--config.checkpoint.fallback=true" in lines[0]
    after = {f: f.read_bytes() for f in (workdir / "checkpoints").rglob("*") if f.is_file()}
    assert after == before  # nothing touched

    p = cli("train", *args, "--config.train.steps=30", "--workdir", str(workdir))
    assert p.returncode == 0, p.stderr
    assert f"checkpoint step {bad}" in p.stderr and "falling back" in p.stderr
    assert "resumed from step 10" in p.stderr
    assert committed(workdir)[-1] == 30
    assert list((workdir / "checkpoints").glob(f"corrupt-{bad}-*"))  # kept for inspection


def test_altered_values_are_detected_by_fingerprint(tmp_path):
    """A checkpoint whose files decode fine but hold other values is still refused."""
    workdir = tmp_path / "altered"
    args = ("--config", SMOKE, "--config.train.steps=10", "--config.checkpoint.every=5",
            "--config.sharding.print_table=false")
    assert cli("train", *args, "--workdir", str(workdir)).returncode == 0
    # rewrite step 10's arrays with step 5's values, through Orbax itself
    other = saved_state(workdir, 5)
    target = workdir / "checkpoints" / "10" / "state"
    shutil.rmtree(target)
    writer = ocp.StandardCheckpointer()
    writer.save(target, other)
    writer.wait_until_finished()
    p = cli("train", *args, "--config.train.steps=15", "--config.checkpoint.fallback=false",
            "--workdir", str(workdir))
    assert p.returncode == 3 and "differ from those saved" in p.stderr, p.stderr


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_and_never_checkpoints_nan(tmp_path, mode):
    workdir = tmp_path / mode
    p = cli("train", "--config", SMOKE, "--workdir", str(workdir), "--config.train.steps=20",
            "--config.optim.lr=1e9", "--config.optim.grad_clip=0.0", "--config.optim.warmup_steps=0",
            "--config.checkpoint.every=2", f"--config.train.nonfinite={mode}",
            "--config.sharding.print_table=false")
    if mode == "stop":
        assert p.returncode == 4, p.stderr
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith("error: non-finite loss, gradients or update at step ") and "Traceback" not in p.stderr
        bad_step = int(line.split("at step ")[1].split()[0])
        assert all(s < bad_step for s in committed(workdir))
    else:
        assert p.returncode == 0, p.stderr
        assert "update skipped" in p.stderr
    for step in committed(workdir):
        import jax
        for leaf in jax.tree.leaves(saved_state(workdir, step)):
            assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float64))), step


def test_time_based_save_interval(tmp_path):
    """Through the CLI: with a tiny interval the run saves by time, whenever no save is in
    flight (the step interval alone would save only at the end)."""
    workdir = tmp_path / "timed"
    p = cli("train", "--config", SMOKE, "--workdir", str(workdir), "--config.train.steps=200",
            "--config.checkpoint.every=100000", "--config.checkpoint.every_seconds=0.001",
            "--config.checkpoint.keep=100", "--config.sharding.print_table=false")
    assert p.returncode == 0, p.stderr
    steps = committed(workdir)
    assert steps[-1] == 200 and len(steps) >= 3, steps  # saved by time, not by the step interval


def test_time_based_save_decisions_follow_the_clock(tmp_path):
    """Each decision is checked against the clock readings around it, whatever the speed: a
    save is due once `every_seconds` have passed since the previous one (and none is in
    flight), never before."""
    import jax.numpy as jnp

    from infra.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, every=10**9, keep=100, every_seconds=0.5)
    last_save, saves, deadline = None, 0, time.time() + 120  # a hang guard, not a speed bound
    step = 0
    while saves < 3 and time.time() < deadline:
        step += 1
        before = time.time()
        due = ckpt.should_save(step)
        after = time.time()
        if last_save is not None:
            if before - last_save[1] >= 0.5:
                assert due, step
            if after - last_save[0] < 0.5:
                assert not due, step
        if due:
            t0 = time.time()
            ckpt.save(step, {"w": jnp.full((4,), float(step))}, Position(step), {})
            ckpt.wait()
            last_save, saves = (t0, time.time()), saves + (last_save is not None)
        time.sleep(0.05)
    ckpt.close()
    assert saves == 3


def test_nothing_loaded_executes_code():
    """Checkpoints and data are read as arrays, JSON and bytes: no pickle, eval or exec in infra/
    (experiment files are the one thing imported as code, by design)."""
    import re

    offenders = []
    for path in (ROOT / "infra").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"import (cloud)?pickle|\b(cloud)?pickle\.|\bdill\b|(?<![\w.])eval\(|(?<![\w.])exec\(|allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_disk_full_while_saving_is_one_line_and_keeps_earlier_checkpoints(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    env = None
    if not mounted:  # no permission to mount: cap the file size instead (EFBIG, not ENOSPC)
        env = {"INFRA_TEST_FSIZE": str(3 * 2**20)}
    try:
        workdir = mount / "w"
        args = ("train", "--config", SMOKE, "--workdir", str(workdir), "--config.checkpoint.every=5",
                "--config.checkpoint.keep=10", "--config.sharding.print_table=false")
        if mounted:
            p = cli(*args)
        else:
            import resource

            def cap():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 2**20, 3 * 2**20))

            p = cli(*args, preexec_fn=cap)
        assert p.returncode == 3, p.stderr
        lines = [l for l in p.stderr.strip().splitlines() if not l.startswith("step ")]
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith("error: not enough disk space for the checkpoint of step ")
        assert "earlier checkpoints are intact" in lines[0] and "Traceback" not in p.stderr
        good = committed(workdir)
        assert good, "no checkpoint fitted before the disk filled up"
        state = saved_state(workdir, good[-1])
        assert int(state["step"]) == good[-1]
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)])


def test_async_save_owns_its_copy_of_the_state(tmp_path):
    """After save() returns the loop may donate the state (the next train step does): the
    checkpoint must not read it any more. Deleting every array right after save() stands in for
    that donation; the restored values must equal the saved ones, with and without the on-device
    copy, and either kind of checkpoint restores through the other (the files are Orbax's
    standard PyTree format in both)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from infra.checkpoint import Checkpointer

    mesh = jax.make_mesh((8,), ("data",))
    rows = NamedSharding(mesh, P("data"))

    def make_state(seed):
        key = jax.random.key(seed)
        return {"w": jax.device_put(jax.random.normal(key, (1024, 256)), rows),
                "m": {"b": jax.device_put(jnp.arange(256.0) * seed, NamedSharding(mesh, P()))},
                "step": jax.device_put(jnp.int32(seed), NamedSharding(mesh, P()))}

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            make_state(1))
    for device_copy in (True, False):
        ckpt = Checkpointer(tmp_path / str(device_copy), every=1, keep=5, device_copy=device_copy)
        expected = {}
        for step in (1, 2):
            state = make_state(step)
            expected[step] = jax.device_get(state)
            ckpt.save(step, state, Position(step), {})
            if device_copy:
                jax.tree.map(lambda a: a.delete(), state)  # what donation does to the buffers
        ckpt.wait()
        restored, meta, position = ckpt.restore_latest(abstract, lambda s: Position())
        assert meta["step"] == 2 and json.loads(position.state) == {"next_index": 2}
        assert_bit_identical(restored, expected[2])
        assert restored["w"].sharding.is_equivalent_to(rows, 2)
        ckpt.close()
        # the other kind of Checkpointer reads the same files
        other = Checkpointer(tmp_path / str(device_copy), every=1, keep=5,
                             device_copy=not device_copy)
        again, _, _ = other.restore_latest(abstract, lambda s: Position())
        assert_bit_identical(again, expected[2])
        other.close()
