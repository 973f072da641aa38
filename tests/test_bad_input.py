"""Bad input through the CLI: one `error: …` line on stderr naming the problem and the fix, exit
status 2, no traceback, and nothing on disk damaged.

A module fixture trains `lm.py:smoke` once (checkpoints 5 and 10); every bad input then runs
against that same workdir, so a run that got too far before failing would change it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import cli

pytestmark = pytest.mark.slow  # ~20 CLI runs of a few seconds each

SMOKE = "experiments/lm.py:smoke"
QUIET = "--config.sharding.print_table=false"


def fingerprint(workdir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file in the workdir (checkpoints, metrics, config, the
    event log, …), except the lock file, which every attempt takes (it names the holder). A
    refused run appends nothing to the event log either (infra/events.py)."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("trained") / "run"
    p = cli("train", "--config", SMOKE, "--workdir", str(wd), "--config.train.steps=10",
            "--config.checkpoint.every=5", QUIET)
    assert p.returncode == 0, p.stderr
    steps = sorted(int(c.name) for c in (wd / "checkpoints").iterdir() if c.name.isdigit())
    assert steps == [5, 10], steps
    assert (wd / "metrics.jsonl").is_file() and (wd / "config.json").is_file()
    prints = fingerprint(wd)
    assert any(k.startswith("checkpoints/") for k in prints)
    assert any(k.startswith("events/") for k in prints)
    return wd, prints


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory):
    """Inputs on disk: empty files, a directory, a dangling link, a file where a dir should be,
    and (if this machine lets us mount) a read-only tmpfs."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (d / "empty" / name).write_text("")
    (d / "adir").mkdir()
    (d / "dangling.txt").symlink_to(d / "does-not-exist.txt")
    (d / "tiny.txt").write_text("hello world\n")
    (d / "plainfile").write_text("not a directory\n")
    ro = d / "ro"
    ro.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(ro)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):  # no `mount`, or not permitted
        mounted = False
    yield {"dir": d, "ro": ro if mounted else None}
    if mounted:
        subprocess.run(["umount", str(ro)], capture_output=True)


# (id, extra arguments, expected substring). `{wd}` is the trained workdir, `{bad}` the directory
# of bad paths, `{ro}` the read-only mount. `workdir=` replaces the trained workdir.
CASES = [
    ("unknown-experiment", dict(config="experiments/nope.py:smoke"),
     "unknown experiment 'experiments/nope.py': no such file"),
    ("unknown-variant", dict(config="experiments/lm.py:huge"),
     "unknown variant 'huge' of lm.py; known variants: smoke"),
    ("unknown-key", ["--config.optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("wrong-type", ["--config.train.steps=ten"], "config key 'train.steps' expects int, got 'ten'"),
    ("mesh-too-large", ["--config.mesh.data=16"], "needs 16 devices but 8 are available"),
    ("mesh-too-small", ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"],
     "needs 2 devices but 8 are available"),
    ("batch-not-divisible", ["--config.train.batch_size=12"],
     "train.batch_size=12 is not divisible by the 8 batch shards"),
    ("seq-len-too-long", ["--config.data.seq_len=128"],
     "data.seq_len=128 exceeds model.max_seq_len=64"),
    ("data-empty", ["--config.data.files={bad}/empty/*.txt"], "hold no text"),
    ("data-missing", ["--config.data.files={bad}/nothing/*.txt"], "matched no files"),
    ("data-directory", ["--config.data.files={bad}/adir"], "cannot read data file"),
    ("data-dangling-link", ["--config.data.files={bad}/dangling.txt"], "cannot read data file"),
    ("data-too-small", ["--config.data.files={bad}/tiny.txt"], "tokens but one"),
    ("workdir-parent-is-file", dict(workdir="{bad}/plainfile/run"), "is not writable"),
    ("workdir-read-only", dict(workdir="{ro}/run"), "is not writable"),
    ("lr-zero", ["--config.optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    ("lr-negative", ["--config.optim.lr=-1e-3"], "optim.lr must be > 0, got -0.001"),
    ("steps-zero", ["--config.train.steps=0"], "train.steps must be > 0, got 0"),
    ("unknown-model", ["--config.model.name=gpt"], "unknown model 'gpt' (config model.name)"),
    ("unknown-preset", ["--config.sharding.preset=zero3"], "unknown sharding.preset 'zero3'"),
    ("cpu-devices-zero", ["--cpu_devices", "0"], "--cpu_devices must be >= 1, got 0"),
    # found while hardening: each of these used to give a traceback or to run (and write) anyway
    ("lr-nan", ["--config.optim.lr=nan"], "optim.lr must be > 0, got nan"),
    ("seed-negative", ["--config.train.seed=-1"], "train.seed must be >= 0, got -1"),
    ("eval-batches-zero", ["--config.data.eval_batches=0"], "data.eval_batches must be > 0, got 0"),
    ("stop-at-negative", ["--config.train.stop_at=-1"], "train.stop_at must be >= 0"),
    ("adam-b1-above-1", ["--config.optim.b1=1.5"], "optim.b1 must be in [0, 1), got 1.5"),
]


def assert_one_error_line(p: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert p.returncode == 2, (p.returncode, p.stderr)


@pytest.mark.parametrize("extra, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_workdir_intact(trained, bad_paths, extra, expected):
    wd, original = trained
    before = fingerprint(wd)  # == original unless an earlier case damaged the workdir
    fill = lambda s: s.format(wd=wd, bad=bad_paths["dir"], ro=bad_paths["ro"])  # noqa: E731
    config, workdir, args = SMOKE, str(wd), []
    if isinstance(extra, dict):
        if "{ro}" in extra.get("workdir", "") and bad_paths["ro"] is None:
            pytest.skip("cannot mount a read-only tmpfs here")
        config = fill(extra.get("config", config))
        workdir = fill(extra.get("workdir", workdir))
    else:
        args = [fill(a) for a in extra]
    p = cli("train", "--config", config, "--workdir", workdir, QUIET, *args, timeout=180)
    assert_one_error_line(p, expected)
    after = fingerprint(wd)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the failed run changed files in the workdir: {changed}"
    assert after == original


def test_workdir_matches_the_trained_run_after_every_case(trained):
    wd, original = trained
    assert fingerprint(wd) == original


# Inputs that only turn out bad when the checkpoint is read back: each runs on its own copy of the
# trained workdir, because a failure there can move checkpoints aside (infra/checkpoint.py).
RESUME_CASES = [
    pytest.param(["--config.model.d_model=32"], "is from an incompatible model", id="resume-other-shape"),
    pytest.param(["--config.model.param_dtype=bfloat16"], "is from an incompatible model",
                 id="resume-other-dtype"),
]


@pytest.mark.parametrize("args, expected", RESUME_CASES)
def test_bad_input_at_resume_leaves_checkpoints_alone(trained, tmp_path, args, expected):
    original, prints = trained
    wd = tmp_path / "run"
    shutil.copytree(original, wd)
    p = cli("train", "--config", SMOKE, "--workdir", str(wd), QUIET, *args, timeout=180)
    changed = sorted(k for k in prints.keys() | fingerprint(wd).keys()
                     if prints.get(k) != fingerprint(wd).get(k))
    assert not changed, f"the failed run changed files in the workdir: {changed}"
    assert_one_error_line(p, expected)


@pytest.mark.parametrize("extra", [["--config.model.d_model=128"],  # incompatible checkpoint
                                   ["--config.data.files={bad}/tiny.txt"]])  # too little data
def test_a_refused_run_prints_no_layout_table_before_its_error(trained, bad_paths, extra):
    """Errors found before training are the run's only output: the parameter table comes once
    the run is accepted, not as 40 lines above the one that matters."""
    wd, _ = trained
    args = [a.format(bad=bad_paths["dir"]) for a in extra]
    p = cli("train", "--config", SMOKE, "--workdir", str(wd), *args, timeout=180)
    assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr
    assert "param " not in p.stdout and "MiB/dev" not in p.stdout, p.stdout
