"""The training loop. Model-agnostic: a task supplies the model, loss and data.

`run(config, workdir)` builds the mesh, creates the state already sharded (or resumes it from
the latest checkpoint in `workdir`, data position included), trains to `train.steps` with one
jitted step, evaluates on held-out data, checkpoints, logs, and returns (state, history).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from infra import config as config_lib
from infra import mesh as mesh_lib
from infra import sharding
from infra.checkpoint import Checkpointer
from infra.errors import UserError
from infra.metrics import MetricWriter, truncate_history
from infra.optim import make_optimizer
from infra.state import ShardedState, State, replicated, shard_state
from infra.step import make_steps
from infra.tasks import Task, get_task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainer:
    """Everything `run` builds before the loop; useful on its own in notebooks and tests."""

    config: Any
    mesh: jax.sharding.Mesh
    task: Task
    state: ShardedState
    train_step: Callable[[State, dict], tuple[State, dict]]
    eval_step: Callable[[dict, dict], dict]
    batch_shardings: dict


def build(config, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """Mesh, task, sharded state and the jitted train / eval steps for `config`."""
    mesh_lib.initialize_distributed(config.distributed)
    mesh = mesh or mesh_lib.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding.rules, mesh)
    sharding.check_batch_size(
        config.train.batch_size, mesh, rules, jax.process_count(), config.train.microbatches
    )
    task = get_task(config)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    sharded = shard_state(task.build_model, tx, mesh, rules)
    train_step, eval_step = make_steps(
        task, sharded.model.merge, tx, schedule,
        microbatches=config.train.microbatches, mesh=mesh, rules=rules,
    )
    batch_sh = sharding.batch_shardings(mesh, rules, task.batch_axes())
    out = replicated(mesh)
    return Trainer(
        config=config,
        mesh=mesh,
        task=task,
        state=sharded,
        train_step=jax.jit(
            train_step,
            in_shardings=(sharded.shardings, batch_sh),
            out_shardings=(sharded.shardings, out),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            eval_step, in_shardings=(sharded.shardings["params"], batch_sh), out_shardings=out
        ),
        batch_shardings=batch_sh,
    )


def is_main_process() -> bool:
    """Process 0 writes metrics, the resolved config and console summaries."""
    return jax.process_index() == 0


def _prepare_workdir(workdir: str | Path) -> Path:
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir '{workdir}' is not writable ({e.strerror}); choose another --workdir") from None
    return workdir


def _mean(metrics: list[dict]) -> dict[str, float]:
    host = jax.device_get(metrics)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def evaluate(trainer: Trainer, params: dict, batches: list[dict]) -> dict[str, float]:
    """Mean of the task's eval metrics over the held-out batches."""
    return _mean([trainer.eval_step(params, b) for b in batches])


def run(config, workdir: str | Path) -> tuple[State, list[dict]]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint). Returns (state, history).

    `history` is every metric record of the run so far, as written to `metrics.jsonl`.
    """
    workdir = _prepare_workdir(workdir)
    trainer = build(config)
    task, tc = trainer.task, config.train
    is_main = is_main_process()
    if is_main:
        if config.sharding.print_table:
            print(mesh_lib.describe(trainer.mesh))
            print(sharding.sharding_table(
                trainer.state.abstract["params"], trainer.state.shardings["params"],
                config.sharding.warn_replicated_mb,
            ))
        config_lib.save(config, workdir)

    to_global = lambda b: sharding.to_global(b, trainer.batch_shardings)  # noqa: E731
    eval_batches = [to_global(b) for b in task.eval_batches(jax.process_index(), jax.process_count())]

    ckpt = Checkpointer(
        workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    latest = ckpt.latest_step()
    train_iter = task.train_iterator(jax.process_index(), jax.process_count(), start_step=latest or 0)
    if latest is not None:
        # The saved iterator position is exact; it is per process, so after a change of process
        # count the iterator instead starts at the checkpoint's step (set just above).
        same_processes = ckpt.read_meta(latest).get("process_count") == jax.process_count()
        state, _ = ckpt.restore(latest, trainer.state.abstract, train_iter if same_processes else None)
        log.info("resumed from step %d in %s", latest, ckpt.directory)
    else:
        state = trainer.state.init(jax.random.key(tc.seed))
    step = int(state["step"])
    history = truncate_history(workdir, step) if is_main else []
    writer = MetricWriter(
        workdir, total_steps=tc.steps, start_step=step, enabled=is_main, progress_bar=tc.progress_bar
    )
    meta = {"config": config.to_dict(), "experiment": config.experiment}

    def log_eval(step: int) -> None:
        metrics = evaluate(trainer, state["params"], eval_batches)
        history.append(writer.write(step, {f"eval/{k}": v for k, v in metrics.items()}))

    try:
        if step == 0 and tc.eval_at_start:
            log_eval(0)
        units_per_step = tc.batch_size * task.units_per_example()
        pending: list[dict] = []
        first_log = True
        end = min(tc.steps, tc.stop_at or tc.steps)
        while step < end:
            batch = to_global(next(train_iter))
            if first_log and not pending:  # compile ahead of time so throughput excludes it
                t0 = time.perf_counter()
                train_step = trainer.train_step.lower(state, batch).compile()
                compile_s = time.perf_counter() - t0
                t_last, steps_last = time.perf_counter(), step
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            step += 1
            last = step == end
            if step % tc.log_every == 0 or last:
                train = _mean(pending)
                pending = []
                now = time.perf_counter()
                seconds = (now - t_last) / (step - steps_last)
                t_last, steps_last = now, step
                train |= {"step_time_s": seconds, f"{task.unit}_per_sec": units_per_step / seconds}
                if first_log:
                    train["compile_time_s"], first_log = compile_s, False
                history.append(writer.write(step, {f"train/{k}": v for k, v in train.items()}))
                writer.progress(step, {"loss": f"{train['loss']:.3f}",
                                       f"{task.unit}/s": f"{train[f'{task.unit}_per_sec']:,.0f}"})
            if step % tc.eval_every == 0 or last:
                log_eval(step)
            ckpt.save(step, state, train_iter, meta, force=last)
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    return state, history
