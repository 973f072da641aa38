#!/usr/bin/env python3
"""Run one experiment as N JAX processes on this machine: multi-host on a laptop.

    python scripts/launch_local.py --processes 2 --devices-per-process 4 -- \\
        train --config experiments/lm.py:smoke --workdir runs/mp

Each process gets `--cpu_devices D` emulated CPU devices and joins one `jax.distributed` run
through a coordinator on a free localhost port (gloo collectives). Process 0's output is shown
as is, the others' prefixed with `[pN]`. If any process fails, the others are stopped and the
launcher exits with that process's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in stream:
        out.write(prefix + line)
        out.flush()


def launch(processes: int, devices_per_process: int, infra_args: list[str],
           grace_s: float = 10.0) -> int:
    """Start the processes, wait for all; stop the rest as soon as one fails."""
    port = free_port()
    common = [
        f"--config.distributed.coordinator_address=localhost:{port}",
        f"--config.distributed.num_processes={processes}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "INFRA_CPU_DEVICES")}
    procs, pumps = [], []
    for i in range(processes):
        cmd = [sys.executable, "-m", "infra", "--cpu_devices", str(devices_per_process),
               *infra_args, *common, f"--config.distributed.process_id={i}"]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        procs.append(p)
        prefix = "" if i == 0 else f"[p{i}] "
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, prefix, out), daemon=True)
            t.start()
            pumps.append(t)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        status = 130
    finally:
        for p in procs:
            if p.poll() is None and status != 0:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=1)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("infra_args", nargs=argparse.REMAINDER,
                        help="arguments for `python -m infra`, after --")
    args = parser.parse_args(argv)
    infra_args = args.infra_args[1:] if args.infra_args[:1] == ["--"] else args.infra_args
    if not infra_args:
        parser.error("give the infra command after --, e.g. -- train --config experiments/lm.py:smoke --workdir runs/mp")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    return launch(args.processes, args.devices_per_process, infra_args)


if __name__ == "__main__":
    sys.exit(main())
