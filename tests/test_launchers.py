"""The cluster launchers: scripts/launch_tpu.py and scripts/launch_slurm.py (+ slurm_train.sbatch).

Everything runs the scripts in a subprocess from the repository root. Nothing calls the real
gcloud or sbatch: dry runs print commands, and the one end-to-end TPU test puts a fake `gcloud`
first on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import pytest

from tests.helpers import ROOT

TPU = "scripts/launch_tpu.py"
SLURM = "scripts/launch_slurm.py"
BASE = ["--name", "t1", "--zone", "us-east5-b", "--accelerator-type", "v6e-8",
        "--config", "experiments/lm.py:tiny", "--workdir", "runs/x"]
OVERRIDES = ["--config.optim.lr=3e-4", "--config.train.steps", "7"]


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=120)


def dry_run_tpu(*args: str) -> list[list[str]]:
    """The commands a TPU dry run prints, each split into tokens (comments dropped)."""
    res = run_script(TPU, *args, "--dry-run")
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in res.stdout.splitlines() if line and not line.startswith("#")]


def remote(cmd: list[str]) -> str:
    """The --command=... of a gcloud ssh command ('' if none)."""
    return next((t.split("=", 1)[1] for t in cmd if t.startswith("--command=")), "")


def find(cmds: list[list[str]], pred) -> list[int]:
    return [i for i, c in enumerate(cmds) if pred(c)]


def is_gcloud(cmd: list[str], kind: str, verb: str) -> bool:
    return cmd[:5] == ["gcloud", "compute", "tpus", kind, verb]


def test_tpu_single_host_create_copy_install_train_delete_in_order():
    cmds = dry_run_tpu(*BASE, *OVERRIDES)
    create = find(cmds, lambda c: is_gcloud(c, "tpu-vm", "create"))
    scp = find(cmds, lambda c: is_gcloud(c, "tpu-vm", "scp"))
    install = find(cmds, lambda c: is_gcloud(c, "tpu-vm", "ssh") and "pip install -e '.[gcs]'" in remote(c))
    train = find(cmds, lambda c: is_gcloud(c, "tpu-vm", "ssh") and "python -m infra train" in remote(c))
    delete = find(cmds, lambda c: is_gcloud(c, "tpu-vm", "delete"))
    assert all(len(x) == 1 for x in (create, scp, install, train, delete)), cmds
    assert create[0] < scp[0] < install[0] < train[0] < delete[0]

    c = cmds[create[0]]
    assert c[5] == "t1" and "--zone=us-east5-b" in c and "--accelerator-type=v6e-8" in c
    assert "--version=v2-alpha-tpuv6e" in c and "--spot" not in c
    assert "--worker=all" in cmds[scp[0]] and "--worker=all" in cmds[install[0]]
    assert "jax[tpu]" in remote(cmds[install[0]])
    assert "--quiet" in cmds[delete[0]]

    ssh = cmds[train[0]]
    assert "--worker=all" in ssh
    words = shlex.split(remote(ssh))
    i = words.index("python")
    assert words[i:] == ["python", "-m", "infra", "train", "--config", "experiments/lm.py:tiny",
                         "--workdir", "runs/x", "--config.optim.lr=3e-4", "--config.train.steps=7"]


def test_tpu_packs_git_tracked_files():
    res = run_script(TPU, *BASE, "--dry-run")
    assert any("git" in line and "ls-files" in line and "tar" in line for line in res.stdout.splitlines())


def test_tpu_ships_tracked_files_the_config_and_includes_only(tmp_path, monkeypatch):
    """Untracked files of the working tree (an export, a tokenizer, token files) stay here;
    the experiment named by --config and what --include names travel."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import launch_tpu

    repo = tmp_path / "repo"
    for name, text in {"infra/core.py": "x = 1\n", "experiments/new.py": "c = 1\n",
                       "out/model.safetensors": "weights", "tok.json": "{}",
                       "data/docs/part.bin": "tokens"}.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "infra/core.py"], ["commit", "-qm", "init"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    monkeypatch.setattr(launch_tpu, "ROOT", repo)
    args, overrides = launch_tpu.parse_args(
        ["--name", "t1", "--zone", "z", "--accelerator-type", "v6e-8", "--config",
         "experiments/new.py:smoke", "--workdir", "runs/x", "--include", "data"])
    plan = launch_tpu.Plan(args, overrides)
    plan.tarball = str(tmp_path / "ship.tar.gz")
    launch_tpu.pack_tarball(plan)
    with tarfile.open(plan.tarball) as tar:
        assert sorted(tar.getnames()) == ["data/docs/part.bin", "experiments/new.py",
                                          "infra/core.py"]


def test_tpu_reuse_skips_create_but_waits_for_ready():
    cmds = dry_run_tpu(*BASE, "--reuse")
    assert not find(cmds, lambda c: "create" in c[:5])
    assert find(cmds, lambda c: is_gcloud(c, "tpu-vm", "describe"))
    assert find(cmds, lambda c: is_gcloud(c, "tpu-vm", "ssh") and "python -m infra train" in remote(c))


def test_tpu_keep_skips_delete():
    cmds = dry_run_tpu(*BASE, "--keep")
    assert find(cmds, lambda c: is_gcloud(c, "tpu-vm", "create"))
    assert not find(cmds, lambda c: "delete" in c[:5])


def test_tpu_spot_is_in_the_create_command():
    for extra in ([], ["--slices", "2"]):
        cmds = dry_run_tpu(*BASE, "--spot", *extra)
        (create,) = [c for c in cmds if c[4] == "create"]
        assert "--spot" in create
        assert all("--spot" not in c for c in cmds if c is not create)


def test_tpu_multislice_uses_a_queued_resource():
    cmds = dry_run_tpu(*BASE, "--slices", "2", "--project", "p1")
    assert not find(cmds, lambda c: c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"])
    (create,) = [c for c in cmds if is_gcloud(c, "queued-resources", "create")]
    assert create[5] == "t1"
    assert "--node-count=2" in create and "--node-prefix=t1" in create
    assert "--runtime-version=v2-alpha-tpuv6e" in create and "--project=p1" in create
    for c in cmds:
        if c[4] in ("scp", "ssh"):
            assert c[3] == "queued-resources" and "--worker=all" in c and "--node=all" in c
    (train,) = [c for c in cmds if "python -m infra train" in remote(c)]
    words = shlex.split(remote(train))
    assert "--config.distributed.initialize=always" in words and "--config.mesh.dcn_data=2" in words
    (delete,) = [c for c in cmds if "delete" in c[:5]]
    assert is_gcloud(delete, "queued-resources", "delete") and "--force" in delete
    assert cmds.index(delete) == len(cmds) - 1


def test_tpu_multislice_keeps_the_users_dcn_choice():
    cmds = dry_run_tpu(*BASE, "--slices", "2", "--config.mesh.dcn_fsdp=2")
    (train,) = [c for c in cmds if "python -m infra train" in remote(c)]
    words = shlex.split(remote(train))
    assert "--config.mesh.dcn_fsdp=2" in words and not any("dcn_data" in w for w in words)


@pytest.mark.parametrize("accel, version, multihost", [
    ("v6e-8", "v2-alpha-tpuv6e", False), ("v6e-256", "v2-alpha-tpuv6e", True),
    ("v5p-8", "v2-alpha-tpuv5", False), ("v5p-32", "v2-alpha-tpuv5", True),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", True), ("v4-8", "tpu-ubuntu2204-base", False),
])
def test_tpu_runtime_version_and_multihost_by_accelerator(accel, version, multihost):
    args = [a if a != "v6e-8" else accel for a in BASE]
    cmds = dry_run_tpu(*args)
    (create,) = [c for c in cmds if c[4] == "create"]
    assert f"--version={version}" in create
    (train,) = [c for c in cmds if "python -m infra train" in remote(c)]
    # GCE TPU VMs are found through the metadata server, which infra's "auto" mode does not read.
    assert ("--config.distributed.initialize=always" in remote(train)) == multihost


def test_tpu_explicit_version_wins():
    cmds = dry_run_tpu(*BASE, "--version", "v2-alpha-tpuv6e-custom")
    (create,) = [c for c in cmds if c[4] == "create"]
    assert "--version=v2-alpha-tpuv6e-custom" in create


@pytest.mark.parametrize("script, args", [
    (TPU, ["--zone", "z", "--accelerator-type", "v6e-8", "--config", "experiments/lm.py:tiny",
           "--workdir", "w", "--dry-run"]),                                    # no --name
    (TPU, ["--name", "t", "--zone", "z", "--config", "experiments/lm.py:tiny", "--dry-run"]),
    (TPU, [*BASE[:-4], "--config", "experiments/nope.py:x", "--workdir", "w", "--dry-run"]),
    (TPU, [*BASE, "--accelerator-type", "tpu8", "--dry-run"]),
    (TPU, [*BASE, "--dry-run", "--config.optim.lr"]),                          # override without value
    (SLURM, ["--config", "experiments/lm.py:tiny", "--workdir", "w", "--dry-run"]),  # no --nodes
    (SLURM, ["--nodes", "2", "--workdir", "w", "--dry-run"]),                   # no --config
    (SLURM, ["--nodes", "0", "--config", "experiments/lm.py:tiny", "--workdir", "w", "--dry-run"]),
])
def test_bad_flags_fail_with_one_line(script, args):
    res = run_script(script, *args)
    assert res.returncode != 0 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], res.stderr


@pytest.mark.parametrize("script, args, message", [
    (TPU, BASE, "gcloud not found on PATH; install the Google Cloud SDK or use --dry-run"),
    (SLURM, ["--nodes", "2", "--config", "experiments/lm.py:tiny", "--workdir", "w"], "sbatch not found on PATH"),
])
def test_real_run_without_the_cli_fails_with_one_line(script, args, message, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no gcloud, no sbatch
    res = run_script(script, *args, env=env)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def slurm_dry_run(*args: str) -> tuple[str, str]:
    """(sbatch command line, rendered script) of a Slurm dry run."""
    res = run_script(SLURM, *args, "--dry-run")
    assert res.returncode == 0, res.stderr
    command, script = res.stdout.split("\n", 1)
    return command, script.lstrip("\n")


def test_slurm_dry_run_renders_the_batch_script(tmp_path):
    command, script = slurm_dry_run(
        "--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--time", "12:00:00",
        "--config", "experiments/lm.py:tiny", "--workdir", "/shared/runs/a b", *OVERRIDES)
    assert shlex.split(command.split("#")[0])[:2] == ["sbatch", "--parsable"]
    assert script.startswith("#!/bin/bash\n")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    for want in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4", "--time=12:00:00",
                 "--partition=gpu"):
        assert f"#SBATCH {want}" in sbatch, sbatch
    assert len({line.split("=")[0] for line in sbatch}) == len(sbatch)  # no key twice
    # every #SBATCH line comes before the first command, or sbatch ignores it
    first_command = next(i for i, line in enumerate(script.splitlines())
                         if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))

    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    words = shlex.split(srun)
    assert words[:4] == ["srun", "python", "-m", "infra"] and words[4] == "train"
    assert words[-3:-1] == ["--config.optim.lr=3e-4", "--config.train.steps=7"]
    assert "CONFIG=experiments/lm.py:tiny" in script.splitlines()
    assert "WORKDIR='/shared/runs/a b'" in script.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS" in script  # one process per node sees every local GPU

    path = tmp_path / "rendered.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_slurm_template_itself_is_valid_bash_with_defaults():
    template = ROOT / "scripts" / "slurm_train.sbatch"
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    _, script = slurm_dry_run("--nodes", "1", "--config", "experiments/lm.py:tiny", "--workdir", "w")
    assert "#SBATCH --partition" not in script  # only when asked for
    assert 'srun python -m infra train --config "$CONFIG" --workdir "$WORKDIR" "$@"' in script


FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys, time
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    print("ACTIVE" if "queued-resources" in args else "READY")
elif "scp" in args:
    shutil.copy(args[4], os.environ["GCLOUD_COPY"])
elif any("python -m infra train" in a for a in args):
    time.sleep(float(os.environ.get("TRAIN_SLEEP", "0")))
    sys.exit(int(os.environ.get("TRAIN_RC", "0")))
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    """Put a fake gcloud first on PATH; it logs its arguments and copies what scp sends."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "GCLOUD_LOG": str(log), "GCLOUD_COPY": str(tmp_path / "copied.tar.gz")}

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls, tmp_path


def test_tpu_real_run_deletes_after_a_failed_training(fake_gcloud):
    env, calls, tmp = fake_gcloud
    res = run_script(TPU, *BASE, env={**env, "TRAIN_RC": "3"})
    assert res.returncode == 3, res.stderr
    verbs = [c[3] for c in calls()]  # gcloud compute tpus tpu-vm <verb>
    assert verbs[0] == "create" and verbs[-1] == "delete", calls()
    with tarfile.open(tmp / "copied.tar.gz") as tar:
        names = tar.getnames()
    assert "infra/cli.py" in names and "pyproject.toml" in names
    assert not any(n.startswith(".git/") for n in names)


def test_tpu_real_run_deletes_when_interrupted(fake_gcloud):
    env, calls, _ = fake_gcloud
    proc = subprocess.Popen([sys.executable, TPU, *BASE], cwd=ROOT, env={**env, "TRAIN_SLEEP": "60"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # a hang guard only: a loaded machine starts slowly
    while not any(any("python -m infra train" in a for a in c) for c in calls()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert calls()[-1][3] == "delete", calls()


def test_tpu_real_run_keep_does_not_delete(fake_gcloud):
    env, calls, _ = fake_gcloud
    res = run_script(TPU, *BASE, "--reuse", "--keep", env=env)
    assert res.returncode == 0, res.stderr
    assert not any(c[3] in ("create", "delete") for c in calls()), calls()
