"""Scale planner: what a config costs per device and per step on N chips, without running it.

    python -m infra plan --config experiments/lm.py:8b --devices 256 --mesh fsdp=256 \\
        --chip tpu-v5p --price 4.2 [--compile | --no_compile] [--config.k=v ...]

The planner builds the real train step (`infra.train.build`) on a mesh of `devices` emulated CPU
devices, from abstract shapes only (`jax.eval_shape`; nothing is allocated), and reports per
device: parameter, optimizer-state, gradient and activation bytes, FLOPs per step, collective
bytes per step, and — for a chip kind from `infra.hardware` — a step time, scaling efficiency,
throughput and cost. Every number says where it comes from:

* ``exact (abstract state)``: summed from the abstract train state and the `NamedSharding` of
  every leaf (`shard_shape`), i.e. the layout a real run would use. Parameters, optimizer state,
  gradients (same shardings, param dtype) and the batch. (`planner.py`)
* ``measured (XLA)``: from the step compiled ahead of time for the emulated CPU mesh
  (`jit(...).lower(...).compile()`): `cost_analysis()["flops"]` (FLOPs of the SPMD-partitioned
  program, i.e. *per device*), `memory_analysis()` and the collectives in the compiled HLO.
  Compiling is done with ``--compile``, or automatically below `AUTO_COMPILE_MAX_PARAMS`
  parameters; an 8B model on 256 emulated devices takes too long to compile on a CPU. (`hlo.py`)
* ``estimate``: analytic formulas and the step-time model. (`estimate.py`, whose docstring has
  the formulas)

`report.py` formats a `Plan` as text. This module is the public face and the `plan` command.
Neither it nor the modules it imports import JAX at module level: `infra.cli` builds its parser
(with `add_arguments`) before it emulates the CPU devices.
"""

from __future__ import annotations

import argparse

from infra import jsonout
from infra.hardware import known_chips
from infra.plan.estimate import Collective
from infra.plan.hlo import Compiled, hlo_collective_bytes
from infra.plan.planner import (AUTO_COMPILE_MAX_PARAMS, DEFAULT_MFU, ESTIMATE, EXACT, MEASURED,
                                Plan, parse_mesh, plan)
from infra.plan.report import format_plan

__all__ = [
    "AUTO_COMPILE_MAX_PARAMS", "DEFAULT_MFU", "ESTIMATE", "EXACT", "MEASURED", "Collective",
    "Compiled", "Plan", "add_arguments", "format_plan", "hlo_collective_bytes", "parse_mesh",
    "plan", "run_cli",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `plan` command's arguments (on the CLI's subparser)."""
    parser.add_argument("--config", required=True, help="experiments/<name>.py[:variant]")
    parser.add_argument("--devices", type=int, required=True,
                        help="number of chips to plan for (emulated as CPU devices)")
    parser.add_argument("--mesh", default=None,
                        help="mesh sizes, e.g. fsdp=256 or data=2,fsdp=64,tensor=2,dcn_data=2; "
                             "axes not named are 1 (default: the config's mesh.*)")
    parser.add_argument("--chip", default=None, help=f"chip kind: {', '.join(known_chips())}")
    parser.add_argument("--price", type=float, default=None, help="$ per chip-hour")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help="assumed fraction of peak FLOP/s the compute reaches (default 0.5)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile", dest="compile", action="store_true", default=None,
                       help="compile the step for the emulated devices (measured FLOPs/memory)")
    group.add_argument("--no_compile", dest="compile", action="store_false",
                       help="never compile (default: compile below 2e8 parameters)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_cli(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run `plan` from parsed arguments; JAX must already see `args.devices` devices."""
    from infra import config as config_lib

    cfg = config_lib.load(args.config, overrides)
    p = plan(cfg, devices=args.devices, mesh=args.mesh, chip=args.chip,
             price_per_chip_hour=args.price, compile=args.compile, assumed_mfu=args.mfu)
    print(jsonout.dumps(p.to_dict(), indent=2, default=str) if args.json else format_plan(p))
    return 0
