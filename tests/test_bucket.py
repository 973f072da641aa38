"""Workdirs in a bucket (`gs://`), against a real GCS emulator on loopback that the tests start
and stop (gcp-storage-emulator, with GCS's generation headers and conditions added:
tests/gcs_emulator.py; tensorstore and gcsfs reach it through their standard environment
variables, as they would reach a real bucket through default credentials)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from infra import paths  # every bucket path through it: it configures gcsfs first
from infra.errors import UserError
from tests.gcs_emulator import Emulator
from tests.helpers import ROOT, Position, cli, kill_when, popen, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gcp_storage_emulator") is None
                       or importlib.util.find_spec("gcsfs") is None,
                       reason="needs gcp-storage-emulator and gcsfs (the test extra installs them)"),
]
SMOKE = "experiments/lm.py:smoke"
QUIET = "--config.sharding.print_table=false"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    emu = Emulator(tmp_path_factory.mktemp("gcs")).start()
    old = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)  # this process reads the bucket too (epath, Orbax)
    yield emu
    emu.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def gcli(emulator, *args, **kwargs):
    return cli(*args, env=emulator.env, **kwargs)


def bucket_losses(workdir):
    from infra.metrics import read_history

    return [(r["step"], r["train/loss"]) for r in read_history(workdir) if "train/loss" in r]


def restore_state(location):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(location)


def test_a_bucket_workdir_trains_resumes_bit_exactly_and_serves_every_command(emulator, tmp_path):
    args = ("--config", SMOKE, QUIET, "--config.train.steps=20", "--config.train.log_every=1",
            "--config.checkpoint.every=5", "--config.train.eval_every=10")
    # every run loads its programs from the session's compilation cache (tests/conftest.py)
    workdir = "gs://bkt/runs/killed"
    proc = popen("train", *args, "--workdir", workdir, env=emulator.env)
    metrics = paths.path(workdir) / "metrics.jsonl"
    kill_when(lambda: metrics.exists() and any(s >= 12 for s, _ in bucket_losses(workdir)),
              proc, timeout=300, poll=0.2)
    # the resumption first waits out the killed run's lease (14 s here); the uninterrupted local run
    # to compare with trains meanwhile
    resume = popen("train", *args, "--workdir", workdir, env=emulator.env)
    local = tmp_path / "local"
    assert cli("train", *args, "--workdir", str(local)).returncode == 0
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert "resumed from step" in err
    local_losses = [(r["step"], r["train/loss"]) for r in map(
        json.loads, (local / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert bucket_losses(workdir) == local_losses  # bit-identical floats
    import jax

    a = restore_state(local / "checkpoints" / "20" / "state")
    b = restore_state(paths.path(workdir) / "checkpoints" / "20" / "state")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # every command reads the bucket workdir
    report = json.loads(gcli(emulator, "goodput", workdir, "--json").stdout)
    assert report["segments"] == 2 and report["productive_s"] > 0
    g = gcli(emulator, "generate", "--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "4",
             "--temperature", "0", "--json")
    assert g.returncode == 0 and json.loads(g.stdout.strip().splitlines()[-1])["token_ids"], g.stderr
    e = gcli(emulator, "eval", "--workdir", workdir)
    assert e.returncode == 0 and json.loads(e.stdout.strip().splitlines()[-1])["step"] == 20, e.stderr
    pl = gcli(emulator, "plot", workdir, cwd=tmp_path)
    assert pl.returncode == 0 and (tmp_path / "loss.png").stat().st_size > 0, pl.stderr
    assert not (paths.path(workdir) / "loss.png").exists()  # plot never writes into a run
    x = gcli(emulator, "hf", "export", "--workdir", workdir, "--out", "gs://bkt/exported")
    assert x.returncode == 0, x.stderr
    assert {p.name for p in paths.path("gs://bkt/exported").iterdir()} >= {"config.json", "model.safetensors"}
    tensorboard = [p.name for p in (paths.path(workdir) / "tensorboard").iterdir()]
    assert len(tensorboard) == 2 and all(n.startswith("events.out.tfevents") for n in tensorboard)


def test_sharded_state_saves_and_restores_in_a_bucket_on_8_devices(emulator):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from infra.checkpoint import Checkpointer

    rows = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    state = {"w": jax.device_put(jax.random.normal(jax.random.key(0), (1024, 256)), rows),
             "step": jnp.int32(7)}
    expected = jax.device_get(state)
    ckpt = Checkpointer("gs://bkt/sharded", every=1, keep=2)
    ckpt.save(7, state, Position(), {})
    ckpt.wait()
    ckpt.close()
    grid = NamedSharding(jax.make_mesh((4, 2), ("a", "b")), P("b", "a"))  # another layout
    abstract = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=grid),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    other = Checkpointer("gs://bkt/sharded", every=1, keep=2)
    restored, meta, position = other.restore_latest(abstract, lambda s: Position())
    other.close()
    assert meta["step"] == 7 and restored["w"].sharding == grid
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected["w"])


def test_the_emulator_dying_mid_save_is_one_line_and_the_last_commit_restores(emulator):
    from infra.checkpoint import committed_steps

    workdir = "gs://bkt/runs/outage"
    # a real outage is retried for about 15 minutes (checkpoint.storage_retries=32); 2 here
    args = ("--config", SMOKE, QUIET, "--config.train.log_every=1", "--config.checkpoint.every=2",
            "--config.checkpoint.storage_retries=2", "--workdir", workdir)
    proc = popen("train", *args, "--config.train.steps=100000", env=emulator.env)
    wait_for(lambda: len(committed_steps(workdir)) >= 2, proc, timeout=300, poll=0.2)
    emulator.stop()
    try:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 3, err[-3000:]
        errors = [l for l in err.strip().splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert "earlier checkpoints are intact" in errors[0] or "cannot write" in errors[0]
    finally:
        emulator.start()
    last = committed_steps(workdir)[-1]
    # the dead run's lease is taken over once it has not moved for 4 s (not the emulator's
    # 14 s: no other run is alive to lose it)
    p = cli("train", *args, f"--config.train.steps={last + 2}",
            env=emulator.env | {"INFRA_LEASE_EXPIRY_S": "4"})
    assert p.returncode == 0, p.stderr
    assert f"resumed from step {last}" in p.stderr  # never a half-written step


def test_a_missing_bucket_or_no_credentials_fail_before_any_compute(emulator):
    p = gcli(emulator, "train", "--config", SMOKE, "--workdir", "gs://nosuchbucket/run")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: workdir 'gs://nosuchbucket/run' is not writable")
    assert "blocks/0/attn/q" not in p.stdout  # nothing was built
    env = {k: v for k, v in os.environ.items() if k not in emulator.env}
    env |= {"GOOGLE_APPLICATION_CREDENTIALS": str(ROOT / "no-such-key.json"), "INFRA_CPU_DEVICES": "8"}
    p = subprocess.run([sys.executable, "-m", "infra", "train", "--config", SMOKE, "--workdir",
                        "gs://bkt/nocreds"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: no Google Cloud credentials for gs://bkt/nocreds")


def test_the_lease_expiry_setting_is_checked():
    """`INFRA_LEASE_EXPIRY_S`: seconds (>= 2), or unset for 35 s; anything else is one line."""
    from infra.errors import UserError
    from infra.workdir import _lease_expiry

    assert _lease_expiry(None, 35.0) == 35.0 and _lease_expiry("", 35.0) == 35.0
    assert _lease_expiry("14", 35.0) == 14.0
    for bad in ("abc", "0", "-5", "nan", "inf"):
        with pytest.raises(UserError, match="INFRA_LEASE_EXPIRY_S must be a number of seconds"):
            _lease_expiry(bad, 35.0)


def test_a_second_trainer_on_a_bucket_workdir_is_refused(emulator):
    workdir = "gs://bkt/runs/shared"
    args = ("--config", SMOKE, QUIET, "--config.train.steps=100000", "--workdir", workdir)
    first = popen("train", *args, env=emulator.env)
    try:
        wait_for((paths.path(workdir) / "metrics.jsonl").exists, first, timeout=300, poll=0.2)
        p = gcli(emulator, "train", *args)
        assert p.returncode == 2, p.stderr
        assert "is in use by another training run" in p.stderr.strip().splitlines()[-1]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=180)
    assert first.returncode == 75


def test_tokenizer_tools_and_goodput_read_bucket_files(emulator, tmp_path):
    """Files in a bucket: `tokenizer train` trains on a local copy and `tokenize` sizes them in
    the bucket (both used to stat them as local paths: a traceback); goodput reads the log."""
    from infra import goodput
    from infra.data import token_file
    from infra.data.text import default_corpus_files, resolve_files
    from infra.data.tokenizer_cli import train_bpe

    for f in default_corpus_files()[:3]:
        (paths.path("gs://bkt/corpus") / os.path.basename(f)).write_bytes(open(f, "rb").read())
    files = resolve_files("gs://bkt/corpus/*.py", "--files")
    assert len(files) == 3
    trained = train_bpe(files, 300, tmp_path / "tok.json")
    assert trained.vocab_size == 300
    index = token_file.build_token_dir(files, str(trained.path), tmp_path / "tokens", workers=1,
                                       progress=False)
    local = token_file.build_token_dir(default_corpus_files()[:3], str(trained.path),
                                       tmp_path / "local", workers=1, progress=False)
    assert index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"] == \
        local["splits"]["train"]["tokens"] + local["splits"]["val"]["tokens"]
    events = paths.path("gs://bkt/gp/events/process_0.jsonl")
    events.parent.mkdir(parents=True, exist_ok=True)
    events.write_text('{"time": 0, "event": "start"}\n{"time": 2, "event": "exit"}\nnot json\n')
    assert goodput.compute("gs://bkt/gp")["wall_s"] == 2
    with pytest.raises(UserError, match="no workdir"):
        goodput.compute("gs://bkt/nothing-here")
