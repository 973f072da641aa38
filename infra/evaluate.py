"""`python -m infra eval --workdir runs/x [--step N]`: evaluate a checkpoint without training.

The run's own config (`<workdir>/config.json`) rebuilds the task and model; the parameters come
from `restore_params` (read-only: a run still training in that workdir is not disturbed) and
the metrics from the same `Evaluator` part the training loop uses, on the same held-out batches.
"""

from __future__ import annotations

import argparse

from infra import jsonout
from infra.paths import PathLike


def evaluate_checkpoint(workdir: PathLike, *, step: int | None = None) -> tuple[dict, int]:
    """(eval metrics, step) of the newest intact checkpoint in `workdir` (or of `step`)."""
    from infra import config as config_lib
    from infra import process, train
    from infra.checkpoint import restore_params

    process.setup()
    config = config_lib.load_saved(workdir)
    trainer = train.build(config)
    params, step = restore_params(workdir, trainer.state.abstract["params"], step=step)
    return trainer.evaluator()(params), step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="workdir of a training run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_cli(args) -> int:
    import jax

    metrics, step = evaluate_checkpoint(args.workdir, step=args.step)
    if jax.process_index() == 0:
        print(jsonout.dumps({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}))
    return 0
