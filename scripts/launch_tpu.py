#!/usr/bin/env python3
"""Run an experiment on a Cloud TPU VM (or a multislice queued resource), then delete it.

    python scripts/launch_tpu.py --name my-tpu --zone us-east5-b --accelerator-type v6e-8 \\
        --config experiments/lm.py:small --workdir runs/small [--config.k=v ...] [--dry-run]

Steps: create (or --reuse) the TPU VM and wait until it is ready; copy the project (the files git
tracks, the --config file, and what --include names: nothing else of the working tree, so exports,
tokenizers and data under the repository stay here) to every worker; install the project with jax[tpu] in a Python 3.12 venv (uv) on every worker; run
`python -m infra train` on all workers at once, streaming their output here; delete the TPU
unless --keep (also after a failure or Ctrl-C). `--slices N` (N > 1) asks for N slices through a
queued resource (multislice). `--dry-run` prints every command and runs nothing. Standard
library only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launch_common import split_overrides  # noqa: E402 - sibling module in scripts/

ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR = "~/infra"  # where the project lands on each worker
REMOTE_VENV = "~/infra-venv"
TARBALL_REMOTE = "infra.tar.gz"  # relative to the remote home directory
GCLOUD_MISSING = "gcloud not found on PATH; install the Google Cloud SDK or use --dry-run"

# Default runtime (software) version per TPU family, from Cloud TPU's "TPU software versions" page.
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
NODE_BAD_STATES = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING", "HIDDEN"}
QUEUED_BAD_STATES = {"FAILED", "SUSPENDED", "SUSPENDING", "DELETING"}


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


class LaunchError(Exception):
    """A failure with a one-line explanation."""


def default_version(accelerator_type: str) -> str:
    """The TPU VM runtime version for an accelerator type such as v6e-8 or v5litepod-16."""
    family = accelerator_type.rsplit("-", 1)[0]
    if family not in RUNTIME_VERSIONS:
        raise LaunchError(f"no default --version for accelerator type '{accelerator_type}'; pass --version")
    return RUNTIME_VERSIONS[family]


def is_multihost(accelerator_type: str, slices: int) -> bool:
    """True when the run spans several TPU VM hosts (every type above `-8` has several hosts)."""
    return slices > 1 or int(accelerator_type.rsplit("-", 1)[1]) > 8


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(prog="launch_tpu.py", description=__doc__.split("\n\n")[0],
               epilog="Any --config.k=v after the flags is passed to `python -m infra train`.")
    p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    p.add_argument("--zone", required=True, help="e.g. us-east5-b")
    p.add_argument("--project", help="GCP project (default: gcloud's core/project)")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v6e-256, v5litepod-16")
    p.add_argument("--version", help="TPU runtime version (default: chosen from the accelerator family)")
    p.add_argument("--slices", type=int, default=1, help="N > 1: multislice via a queued resource")
    p.add_argument("--reuse", action="store_true", help="use an existing TPU VM / queued resource (deleted at the end unless --keep)")
    p.add_argument("--spot", action="store_true", help="request Spot capacity")
    p.add_argument("--config", required=True, help="experiments/<name>.py:<variant>")
    p.add_argument("--workdir", required=True, help="gs:// or path on the workers (relative: under ~/infra)")
    p.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
    p.add_argument("--include", action="append", default=[], metavar="PATH",
                   help="also copy this file or directory of the repository (git tracks the rest)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.add_argument("--python-version", default="3.12", help="Python for the workers' venv (default 3.12)")
    p.add_argument("--wait-minutes", type=float, default=120, help="how long to wait for the TPU to be ready")
    try:
        rest, overrides = split_overrides(argv)
    except ValueError as e:
        p.error(str(e))
    args = p.parse_args(rest)
    if args.slices < 1:
        p.error(f"--slices must be >= 1, got {args.slices}")
    if not re.fullmatch(r"v\d+[a-z]*-\d+", args.accelerator_type):
        p.error(f"--accelerator-type must look like v6e-8 or v5p-32, got '{args.accelerator_type}'")
    config_file = args.config.split(":", 1)[0]
    if not (ROOT / config_file).is_file():
        p.error(f"--config file '{config_file}' not found under {ROOT}")
    for path in args.include:
        full = (ROOT / path).resolve()
        if not full.exists() or not full.is_relative_to(ROOT):
            p.error(f"--include '{path}' is not a file or directory under {ROOT}")
    try:
        args.version = args.version or default_version(args.accelerator_type)
    except LaunchError as e:
        p.error(str(e))
    return args, overrides


@dataclass
class Step:
    """One named step: a list of commands (each a list of tokens)."""

    title: str
    commands: list[list[str]]


class Plan:
    """Every gcloud command of a launch, built from the parsed flags."""

    def __init__(self, args: argparse.Namespace, overrides: list[str]):
        self.args = args
        self.multislice = args.slices > 1
        self.kind = "queued-resources" if self.multislice else "tpu-vm"
        self.tarball = str(Path(tempfile.gettempdir()) / f"infra-{args.name}.tar.gz")
        self.overrides = self._train_overrides(overrides)

    def _train_overrides(self, overrides: list[str]) -> list[str]:
        """User overrides, plus what a multi-host or multislice run needs unless already given."""
        out = list(overrides)
        keys = {o.split("=", 1)[0] for o in overrides}
        # jax finds GCE TPU VM hosts through the metadata server, which infra's "auto" mode does
        # not consult: ask for jax.distributed.initialize() explicitly on multi-host TPUs.
        if is_multihost(self.args.accelerator_type, self.args.slices) and \
                "--config.distributed.initialize" not in keys:
            out.append("--config.distributed.initialize=always")
        if self.multislice and not any(k.startswith("--config.mesh.dcn_") for k in keys):
            out.append(f"--config.mesh.dcn_data={self.args.slices}")  # data parallel across slices
        return out

    def gcloud(self, *tokens: str) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", self.kind, *tokens, f"--zone={self.args.zone}"]
        return cmd + ([f"--project={self.args.project}"] if self.args.project else [])

    def _all(self) -> list[str]:
        return ["--worker=all"] + (["--node=all"] if self.multislice else [])

    def create(self) -> list[str]:
        a = self.args
        if self.multislice:
            cmd = self.gcloud("create", a.name, f"--accelerator-type={a.accelerator_type}",
                              f"--runtime-version={a.version}", f"--node-count={a.slices}",
                              f"--node-prefix={a.name}")
        else:
            cmd = self.gcloud("create", a.name, f"--accelerator-type={a.accelerator_type}",
                              f"--version={a.version}")
        return cmd + (["--spot"] if a.spot else [])

    def describe(self) -> list[str]:
        field = "state.state" if self.multislice else "state"
        return self.gcloud("describe", self.args.name, f"--format=value({field})")

    def extra_paths(self) -> list[str]:
        """What travels beside the tracked files: the --config file and every --include."""
        return sorted({self.args.config.split(":", 1)[0], *self.args.include})

    def pack(self) -> list[list[str]]:
        """Tracked files plus `extra_paths` (a new, un-added experiment travels; an export or
        a token directory in the working tree does not); `pack_tarball` does this in Python,
        skipping deleted files."""
        ls = ["git", "-C", str(ROOT), "ls-files", "-z", "--cached"]
        return [ls, ["tar", "-czf", self.tarball, "--null", "-T", "-", *self.extra_paths()]]

    def scp(self) -> list[str]:
        return self.gcloud("scp", self.tarball, f"{self.args.name}:{TARBALL_REMOTE}", *self._all())

    def ssh(self, remote: str) -> list[str]:
        return self.gcloud("ssh", self.args.name, *self._all(), f"--command={remote}")

    def install_script(self) -> str:
        py = shlex.quote(self.args.python_version)
        return " && ".join([
            "set -e",
            f"mkdir -p {REMOTE_DIR}",
            f"tar -xzf ~/{TARBALL_REMOTE} -C {REMOTE_DIR}",
            'export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"',
            "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
            f"uv venv --allow-existing --python {py} {REMOTE_VENV}",
            f". {REMOTE_VENV}/bin/activate",
            f"cd {REMOTE_DIR}",
            # jax[tpu] within pyproject's jax pin; gcsfs for gs:// workdirs and data
            "uv pip install -e '.[gcs]' 'jax[tpu]'",
        ])

    def train_command(self) -> list[str]:
        a = self.args
        return ["python", "-m", "infra", "train", "--config", a.config, "--workdir", a.workdir, *self.overrides]

    def run_script(self) -> str:
        return (f"cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && "
                f"PYTHONUNBUFFERED=1 {shlex.join(self.train_command())}")

    def delete(self) -> list[str]:
        extra = ["--force"] if self.multislice else []  # --force: delete the slices, then the QR
        return self.gcloud("delete", self.args.name, *extra, "--quiet")

    def steps(self) -> list[Step]:
        """The launch in order; the last step (delete) runs in a `finally`."""
        setup = [] if self.args.reuse else [Step("create", [self.create()])]
        state = "ACTIVE" if self.multislice else "READY"
        return setup + [
            Step(f"wait until {state}", [self.describe()]),
            Step("copy the project (git ls-files) to every worker", [*self.pack(), self.scp()]),
            Step("install on every worker", [self.ssh(self.install_script())]),
            Step("train on every worker", [self.ssh(self.run_script())]),
            *([] if self.args.keep else [Step("delete", [self.delete()])]),
        ]


def print_dry_run(plan: Plan) -> None:
    for step in plan.steps():
        print(f"# {step.title}")
        cmds = step.commands
        if cmds[:2] == plan.pack():
            print(f"{shlex.join(cmds[0])} | {shlex.join(cmds[1])}")
            cmds = cmds[2:]
        for cmd in cmds:
            print(shlex.join(cmd))


def run(cmd: list[str], *, capture: bool = False) -> subprocess.CompletedProcess:
    """Run one command, echoing it; output streams to the terminal unless captured."""
    if not capture:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def check(cmd: list[str], what: str) -> None:
    rc = run(cmd).returncode
    if rc != 0:
        raise LaunchError(f"{what} failed (exit status {rc})")


def wait_ready(plan: Plan) -> None:
    """Poll `describe` until the TPU VM is READY (queued resource: ACTIVE)."""
    want, bad = ("ACTIVE", QUEUED_BAD_STATES) if plan.multislice else ("READY", NODE_BAD_STATES)
    deadline = time.monotonic() + plan.args.wait_minutes * 60
    last = None
    print(f"+ {shlex.join(plan.describe())}  (until {want})", file=sys.stderr, flush=True)
    while True:
        res = run(plan.describe(), capture=True)
        state = res.stdout.strip() if res.returncode == 0 else ""
        if res.returncode != 0:
            detail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise LaunchError(f"cannot describe '{plan.args.name}': {detail}")
        if state != last:
            print(f"  state: {state or '?'}", file=sys.stderr, flush=True)
            last = state
        if state == want:
            return
        if state in bad:
            raise LaunchError(f"'{plan.args.name}' is {state}, not {want}")
        if time.monotonic() > deadline:
            raise LaunchError(f"'{plan.args.name}' not {want} after {plan.args.wait_minutes:g} min (last state {state})")
        time.sleep(15)


def pack_tarball(plan: Plan) -> None:
    """Tar the files git tracks and `plan.extra_paths()` into `plan.tarball`."""
    print(f"+ {shlex.join(plan.pack()[0])} | {shlex.join(plan.pack()[1])}", file=sys.stderr, flush=True)
    res = run(plan.pack()[0], capture=True)
    if res.returncode != 0:
        raise LaunchError(f"git ls-files failed in {ROOT}: {res.stderr.strip()}")
    names = {n for n in res.stdout.split("\0") if n and (ROOT / n).is_file()}
    for extra in plan.extra_paths():
        path = ROOT / extra
        found = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        names.update(str(f.relative_to(ROOT)) for f in found)
    with tarfile.open(plan.tarball, "w:gz") as tar:
        for name in sorted(names):
            tar.add(ROOT / name, arcname=name, recursive=False)
    print(f"  {len(names)} files -> {plan.tarball}", file=sys.stderr)


def warn_about_workdir(plan: Plan) -> None:
    a = plan.args
    if a.workdir.startswith("gs://"):
        return  # every worker sees it, and it outlives the VM
    if is_multihost(a.accelerator_type, a.slices):
        print(f"warning: --workdir {a.workdir} is on each worker's own disk; a multi-host run needs "
              "one shared path (gs:// or a mounted filesystem)", file=sys.stderr)
    elif not a.keep:
        print(f"warning: --workdir {a.workdir} is on the TPU VM's disk and is deleted with it; "
              "pass --keep or use a shared path", file=sys.stderr)


def launch(plan: Plan) -> int:
    """Create/reuse, copy, install, train; always delete unless --keep. Returns the exit status."""
    a = plan.args
    status = 1
    try:
        if not a.reuse:
            check(plan.create(), "create")
        wait_ready(plan)
        pack_tarball(plan)
        check(plan.scp(), "copy")
        check(plan.ssh(plan.install_script()), "install")
        status = run(plan.ssh(plan.run_script())).returncode
        if status != 0:
            print(f"launch_tpu.py: training exited with status {status}", file=sys.stderr)
    except LaunchError as e:
        print(f"launch_tpu.py: error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\nlaunch_tpu.py: interrupted", file=sys.stderr)
        status = 130
    finally:
        if not a.keep:
            status = delete(plan, status)
        else:
            print(f"kept {a.name}; delete it with: {shlex.join(plan.delete())}", file=sys.stderr)
    return status


def delete(plan: Plan, status: int) -> int:
    """Delete the TPU if it exists (a failed or interrupted create may have left one)."""
    try:
        if run(plan.describe(), capture=True).returncode != 0:
            print(f"{plan.args.name} not found, so not deleted; if it does exist: "
                  f"{shlex.join(plan.delete())}", file=sys.stderr)
            return status
        print(f"deleting {plan.args.name} (Ctrl-C now leaves it running)", file=sys.stderr, flush=True)
        rc = run(plan.delete()).returncode
    except KeyboardInterrupt:
        rc = 130
    if rc != 0:
        print(f"launch_tpu.py: delete failed; delete it by hand: {shlex.join(plan.delete())}",
              file=sys.stderr)
        status = status or 1
    return status


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan(args, overrides)
    if args.dry_run:
        print_dry_run(plan)
        return 0
    if shutil.which("gcloud") is None:
        print(f"launch_tpu.py: error: {GCLOUD_MISSING}", file=sys.stderr)
        return 2
    if shutil.which("git") is None:
        print("launch_tpu.py: error: git not found on PATH; it lists the files to copy", file=sys.stderr)
        return 2
    warn_about_workdir(plan)
    signal.signal(signal.SIGTERM, _sigterm)
    return launch(plan)


if __name__ == "__main__":
    sys.exit(main())
