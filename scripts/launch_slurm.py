#!/usr/bin/env python3
"""Render scripts/slurm_train.sbatch for one run and submit it with sbatch.

    python scripts/launch_slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 \\
        --config experiments/lm.py:small --workdir /shared/runs/small [--config.k=v ...] [--dry-run]

The rendered script sets the #SBATCH values from the flags and fixes CONFIG, WORKDIR and the
overrides in its `srun python -m infra train` line; sbatch reads it on stdin and runs it from the
repository root. One JAX process per node drives all of that node's GPUs (see the script).
`--dry-run` prints the sbatch command line and the rendered script instead of submitting.
Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch_common import split_overrides  # noqa: E402 - sibling module in scripts/

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "scripts" / "slurm_train.sbatch"
SRUN_LINE = 'srun python -m infra train --config "$CONFIG" --workdir "$WORKDIR" "$@"'
SBATCH_MISSING = "sbatch not found on PATH; run this on a Slurm login node or use --dry-run"


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(prog="launch_slurm.py", description=__doc__.split("\n\n")[0],
               epilog="Any --config.k=v after the flags is passed to `python -m infra train`.")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes (one JAX process each)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--account", help="Slurm account to charge (default: yours)")
    p.add_argument("--time", default="04:00:00", help="time limit, e.g. 12:00:00 or 1-00:00:00")
    p.add_argument("--job-name", default="infra-train", help="job name (default infra-train)")
    p.add_argument("--config", required=True, help="experiments/<name>.py:<variant>")
    p.add_argument("--workdir", required=True, help="run directory on a filesystem every node sees")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command and script, submit nothing")
    try:
        rest, overrides = split_overrides(argv)
    except ValueError as e:
        p.error(str(e))
    args = p.parse_args(rest)
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    for name in ("time", "job_name", "partition", "account"):
        value = getattr(args, name)
        if value is not None and not re.fullmatch(r"[\w.:,+-]+", value):
            p.error(f"--{name.replace('_', '-')} has unexpected characters: '{value}'")
    config_file = args.config.split(":", 1)[0]
    if not (ROOT / config_file).is_file():
        p.error(f"--config file '{config_file}' not found under {ROOT}")
    return args, overrides


def _set_sbatch(lines: list[str], key: str, value: str) -> list[str]:
    """Set `#SBATCH --key=value`, replacing an existing line or adding one after the last #SBATCH."""
    pattern = re.compile(rf"#SBATCH --{re.escape(key)}(=.*)?$")
    hits = [i for i, line in enumerate(lines) if pattern.match(line)]
    if hits:
        lines[hits[0]] = f"#SBATCH --{key}={value}"
    else:
        last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH "))
        lines.insert(last + 1, f"#SBATCH --{key}={value}")
    return lines


def render(args: argparse.Namespace, overrides: list[str], template: str | None = None) -> str:
    """The batch script for this run: the template with its values filled in."""
    lines = (TEMPLATE.read_text() if template is None else template).splitlines()
    for key, value in [("job-name", args.job_name), ("nodes", args.nodes), ("ntasks-per-node", 1),
                       ("gpus-per-node", args.gpus_per_node), ("time", args.time),
                       ("partition", args.partition), ("account", args.account)]:
        if value is not None:
            lines = _set_sbatch(lines, key, str(value))
    out = []
    for line in lines:
        if line.startswith('CONFIG="${CONFIG:?'):
            line = f"CONFIG={shlex.quote(args.config)}"
        elif line.startswith('WORKDIR="${WORKDIR:?'):
            line = f"WORKDIR={shlex.quote(args.workdir)}"
        elif line == SRUN_LINE and overrides:
            line = SRUN_LINE.replace('"$@"', f'{shlex.join(overrides)} "$@"')
        out.append(line)
    text = "\n".join(out) + "\n"
    for needed in ("CONFIG=", "WORKDIR=", "srun python -m infra train"):
        if needed not in text:
            raise SystemExit(f"launch_slurm.py: error: {TEMPLATE} no longer has its '{needed}' line")
    return text


def sbatch_command() -> list[str]:
    return ["sbatch", "--parsable", f"--chdir={ROOT}"]


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    script = render(args, overrides)
    cmd = sbatch_command()
    if args.dry_run:
        print(f"{shlex.join(cmd)}  # reads the script below on stdin")
        print()
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        print(f"launch_slurm.py: error: {SBATCH_MISSING}", file=sys.stderr)
        return 2
    res = subprocess.run(cmd, input=script, text=True, capture_output=True, cwd=ROOT)
    if res.returncode != 0:
        detail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"launch_slurm.py: error: sbatch failed: {detail}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]
    log = ROOT / f"slurm-{args.job_name}-{job_id}.out"
    print(f"submitted job {job_id}; log: {log}\n  follow: tail -f {shlex.quote(str(log))}\n"
          f"  cancel: scancel {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
