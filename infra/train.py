"""The training loop. Model-agnostic: a task supplies the model, loss and data.

`run(config, workdir)` builds the mesh, creates the state already sharded (or resumes it from
the latest checkpoint in `workdir`, data position included), trains to `train.steps` with one
jitted step, evaluates on held-out data, checkpoints, logs, and returns (state, history).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from infra import config as config_lib
from infra import mesh as mesh_lib
from infra import sharding, utilization
from infra.checkpoint import Checkpointer
from infra.errors import NumericalError, PeerError, Preempted, UserError
from infra.metrics import MetricWriter, truncate_history
from infra.optim import make_optimizer
from infra.peers import PeerWatchdog
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


def _mean(host_metrics: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in host_metrics])) for k in host_metrics[0]}


def evaluate(trainer: Trainer, params: dict, batches: list[dict]) -> dict[str, float]:
    """The task's eval metrics over all held-out batches (`Task.summarize_eval`)."""
    return trainer.task.summarize_eval(jax.device_get([trainer.eval_step(params, b) for b in batches]))


class _SigtermFlag:
    """Single-process preemption: SIGTERM sets a flag the loop reads between steps.

    Multi-process runs leave SIGTERM to JAX's preemption service, which makes every process
    agree on the step to stop at (`Checkpointer.reached_preemption`).
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _first_nonfinite(records: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    return next(((s, m) for s, m in records if m["skipped"]), None)


def run(config, workdir: str | Path) -> tuple[State, list[dict]]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint). Returns (state, history).

    `history` is every metric record of the run so far, as written to `metrics.jsonl`.
    Raises `Preempted` after SIGTERM (a checkpoint is written first) and `NumericalError` on a
    non-finite loss or gradient with `train.nonfinite="stop"`; see `infra/errors.py`.
    """
    workdir = _prepare_workdir(workdir)
    trainer = build(config)
    task, cc = trainer.task, config.checkpoint
    if is_main_process() and config.sharding.print_table:
        print(mesh_lib.describe(trainer.mesh))
        print(sharding.sharding_table(
            trainer.state.abstract["params"], trainer.state.shardings["params"],
            config.sharding.warn_replicated_mb,
        ))

    to_global = lambda b: sharding.to_global(b, trainer.batch_shardings)  # noqa: E731
    pid, pcount = jax.process_index(), jax.process_count()
    eval_batches = [to_global(b) for b in task.eval_batches(pid, pcount)]
    ckpt = Checkpointer(
        workdir, every=cc.every, keep=cc.keep, async_save=cc.async_save,
        device_copy=cc.device_copy, every_seconds=cc.every_seconds,
        fallback=cc.fallback,
    )
    peers = PeerWatchdog(timeout_s=config.distributed.heartbeat_timeout_s * 2).start()
    clean = False
    try:
        result = _train(config, workdir, trainer, ckpt, eval_batches, to_global)
        clean = True
        return result
    except Preempted:
        clean = True  # every process stops at the same agreed step
        raise
    finally:
        try:
            ckpt.close()
        finally:
            peers.close(clean)


def _train(config, workdir, trainer, ckpt, eval_batches, to_global):
    task, tc = trainer.task, config.train
    is_main = is_main_process()
    pid, pcount = jax.process_index(), jax.process_count()

    # Restore the newest intact checkpoint with the data position it saved, or start afresh.
    make_iterator = lambda start: task.train_iterator(pid, pcount, start_step=start)  # noqa: E731
    restored = ckpt.restore_latest(trainer.state.abstract, make_iterator)
    if restored is not None:
        state, saved_meta, train_iter = restored
        log.info("resumed from step %d in %s", saved_meta["step"], ckpt.directory)
    else:
        state, train_iter = trainer.state.init(jax.random.key(tc.seed)), make_iterator(0)
    step = int(state["step"])

    if is_main:  # only now that config, data and checkpoint are known to be good
        config_lib.save(config, workdir)
    history = truncate_history(workdir, step) if is_main else []
    writer = MetricWriter(
        workdir, total_steps=tc.steps, start_step=step, enabled=is_main, progress_bar=tc.progress_bar
    )
    meta = {"config": config.to_dict(), "experiment": config.experiment}

    def log_eval(step: int) -> None:
        metrics = evaluate(trainer, state["params"], eval_batches)
        history.append(writer.write(step, {f"eval/{k}": v for k, v in metrics.items()}))
        writer.progress(step, {f"eval {k}": f"{metrics[k]:.4g}" for k in task.headline_metrics
                               if k in metrics})

    def check_finite(records: list[tuple[int, dict]]) -> None:
        bad = _first_nonfinite(records)
        if bad is None:
            return
        s, m = bad
        what = ", ".join(f"{k}={m[k]}" for k in ("loss", "grad_norm"))
        if tc.nonfinite == "stop":
            raise NumericalError(
                f"non-finite loss or gradients at step {s} ({what}); the update was not applied "
                f"and no checkpoint holds it (latest: step {ckpt.latest_step()}); lower optim.lr "
                f"or raise optim.grad_clip, or set --config.train.nonfinite=skip"
            )
        for s, m in records:
            if m["skipped"]:
                log.warning("warning: non-finite loss or gradients at step %d (loss=%s, "
                            "grad_norm=%s); update skipped", s, m["loss"], m["grad_norm"])

    units_per_step = tc.batch_size * task.units_per_example()
    end = min(tc.steps, tc.stop_at or tc.steps)
    pending: list[tuple[int, Any]] = []  # (step, device metrics) since the last log
    checked = 0  # how many of `pending` were already checked for NaN/Inf
    compile_s, waited = None, 0.0
    profile = tuple(config.profile.steps)
    try:
        with _SigtermFlag() as sigterm:
            if step == 0 and tc.eval_at_start:
                log_eval(0)
            while step < end:
                t_data = time.perf_counter()
                batch = to_global(next(train_iter))
                waited += time.perf_counter() - t_data
                if compile_s is None:  # compile ahead of time so throughput excludes it
                    t0 = time.perf_counter()
                    train_step = trainer.train_step.lower(state, batch).compile()
                    compile_s = time.perf_counter() - t0
                    flops = utilization.compiled_flops(train_step)
                    peak, _ = utilization.peak_flops_per_device()
                    t_last, steps_last, first_log, waited = time.perf_counter(), step, True, 0.0
                if profile and step + 1 == profile[0]:
                    jax.profiler.start_trace(str(workdir / "tensorboard"))
                state, metrics = train_step(state, batch)
                step += 1
                if profile and step == profile[1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                pending.append((step, metrics))
                last = step == end
                preempted = sigterm.raised or ckpt.reached_preemption(step)
                log_now = step % tc.log_every == 0 or last
                save_now = last or preempted or ckpt.should_save(step)
                if log_now or save_now:  # a sync point: look at every step since the last one
                    host = jax.device_get(pending[checked:])  # one transfer for all of them
                    check_finite(host)
                    pending[checked:] = host
                    checked = len(pending)
                if log_now:
                    train = _mean([m for _, m in pending])
                    pending, checked = [], 0
                    interval, steps_done = time.perf_counter() - t_last, step - steps_last
                    seconds = interval / steps_done
                    train |= {
                        "step_time_s": seconds,
                        f"{task.unit}_per_sec": units_per_step / seconds,
                        "input_wait_frac": waited / interval,
                    }
                    if flops:
                        train |= {
                            "flops_per_step": flops * jax.device_count(),
                            "flops_per_sec_per_device": flops / seconds,
                        }
                        if peak:
                            train["mfu"] = flops / seconds / peak
                    if (memory := utilization.peak_memory_bytes()) is not None:
                        train["peak_memory_gib"] = memory / 2**30
                    t_last, steps_last, waited = time.perf_counter(), step, 0.0
                    if first_log:
                        train["compile_time_s"], first_log = compile_s, False
                    history.append(writer.write(step, {f"train/{k}": v for k, v in train.items()}))
                    writer.progress(step, {"loss": f"{train['loss']:.3f}",
                                           f"{task.unit}/s": f"{train[f'{task.unit}_per_sec']:,.0f}"})
                if step % tc.eval_every == 0 or last:
                    log_eval(step)
                if save_now:
                    ckpt.save(step, state, train_iter, meta)
                if preempted and not last:
                    ckpt.wait()
                    raise Preempted(
                        f"stopped at step {step} on SIGTERM; checkpoint written to "
                        f"{ckpt.directory / str(step)}; run the same command to resume"
                    )
            ckpt.wait()
    except jax.errors.JaxRuntimeError as e:
        if pcount > 1:
            raise PeerError(
                f"process {pid}: a collective failed ({str(e).strip().splitlines()[0][:160]}); "
                f"another process of this run probably died: see its log, then rerun to resume"
            ) from None
        raise
    finally:
        writer.close()
    return state, history
