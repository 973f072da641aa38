"""The training loop. Model-agnostic: a task supplies the model, loss and data.

`run(config, workdir)` builds the mesh, creates the state already sharded (or resumes it from
the latest checkpoint in `workdir`, data position included), trains to `train.steps` with one
jitted step, evaluates on held-out data, checkpoints, logs, and returns (state, history). The
loop itself is a short list of calls; each concern is a part in `infra/loop/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Any, Callable

import jax
from flax import traverse_util

from infra import config as config_lib
from infra import mesh as mesh_lib
from infra import host_malloc, process, sharding
from infra import workdir as workdir_lib
from infra.checkpoint import Checkpointer
from infra.config.sections import (CheckpointConfig, DistributedConfig, ProfileConfig,
                                   ShardingConfig, TrainConfig)
from infra.errors import Preempted, UserError
from infra.events import EventLog
from infra.interop import init_from
from infra.loop import preemption
from infra.loop.evaluator import Evaluator
from infra.loop.frozen_step import FrozenStep
from infra.loop.nonfinite import NonFiniteGuard
from infra.loop.pending import PendingMetrics
from infra.loop.profiler import ProfilerWindow
from infra.loop.reporter import Reporter
from infra.loop.throughput import ThroughputMeter
from infra.models import attention_kernels, lora, moe_parallel, pipeline
from infra.models.attention import uncounted_flops_per_token
from infra.optim import make_optimizer
from infra.paths import PathLike
from infra.peers import PeerWatchdog
from infra.state import ShardedState, State, replicated, shard_state
from infra.step import make_steps
from infra.tasks import Task, get_task, logical_rules

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
    rules: tuple = ()  # the logical-axis rules the state and batches are placed by
    schedule: pipeline.Schedule | None = None  # pipeline stages (mesh.stage > 1)

    def to_global(self, local_batch: dict) -> dict:
        """This process's numpy batch -> global arrays in the batch shardings."""
        return sharding.to_global(local_batch, self.batch_shardings)

    @property
    def frozen_params(self) -> frozenset[tuple]:
        """Paths of the parameters the step leaves as they are (and does not donate)."""
        if self.state.model.trained is None:
            return frozenset()
        flat = traverse_util.flatten_dict(self.state.abstract["params"])
        return frozenset(flat.keys() - self.state.model.trained)

    def evaluator(self, events=None) -> Callable[[dict], dict]:
        """The task's eval metrics over this process's share of the held-out batches (or the
        task's own evaluator, `Task.evaluator`)."""
        custom = self.task.evaluator(self, events)
        if custom is not None:
            return custom
        batches = self.task.eval_batches(jax.process_index(), jax.process_count())
        return Evaluator(self.task, self.eval_step, [self.to_global(b) for b in batches], events)


def build(config, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """Mesh, task, sharded state and the jitted train / eval steps for `config`."""
    mesh_lib.initialize_distributed(config.distributed)
    mesh = mesh or mesh_lib.make_mesh(config.mesh)
    rules = sharding.normalize_rules(logical_rules(config), mesh)
    tc = TrainConfig.from_config(config.train)
    task = get_task(config)
    moe_parallel.check_experts_fit(int(config.model.get("num_experts", 0) or 0), mesh)
    stages = pipeline.schedule_for(config.get("pipeline"), mesh, config.model, rules,
                                     tc.batch_size * task.rows_per_example // tc.microbatches)
    attention_kernels.resolve(config.model.get("attention", "xla"),  # a kernel the devices lack
                              mesh.devices.flat[0].platform, config.model.get("dtype"))
    sharding.check_batch_size(tc.batch_size, mesh, rules, jax.process_count(),
                              tc.microbatches, task.rows_per_example)
    tx, schedule = make_optimizer(config.optim, tc.steps)
    sharded = shard_state(task.build_model, tx, mesh, rules, trainable=task.trainable)
    train_step, eval_step = make_steps(
        task, sharded.model.merge, tx, schedule,
        microbatches=tc.microbatches, mesh=mesh, rules=rules,
        split_trained=sharded.model.split_trained, stages=stages,
    )
    batch_sh = sharding.batch_shardings(mesh, rules, task.batch_axes())
    out = replicated(mesh)
    if sharded.model.trained is None:
        step = jax.jit(train_step, in_shardings=(sharded.shardings, batch_sh),
                       out_shardings=(sharded.shardings, out), donate_argnums=0)
    else:  # the frozen weights are not donated: saves need not copy them
        step = FrozenStep(train_step, sharded.model.split_trained, sharded.shardings, batch_sh, out)
    return Trainer(
        config=config,
        mesh=mesh,
        task=task,
        state=sharded,
        train_step=step,
        eval_step=jax.jit(
            eval_step, in_shardings=(sharded.shardings["params"], batch_sh), out_shardings=out
        ),
        batch_shardings=batch_sh,
        rules=rules,
        schedule=stages,
    )


def trained_summary(state: ShardedState) -> str:
    """How much of the model trains and what its optimizer state costs (from the abstract
    state: exact, nothing allocated)."""
    def size(tree) -> tuple[int, int]:
        leaves = jax.tree.leaves(tree)
        return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)

    params, _ = size(state.abstract["params"])
    trained, _ = size(state.model.split_trained(state.abstract["params"])[0])
    _, opt_bytes = size(state.abstract["opt_state"])
    return (f"training {trained:,} of {params:,} parameters ({trained / params:.2%}); "
            f"optimizer state {opt_bytes / 2**20:.2f} MiB")


def is_main_process() -> bool:
    """Process 0 writes metrics, the resolved config and console summaries."""
    return jax.process_index() == 0


def evaluate(trainer: Trainer, params: dict, batches: list[dict]) -> dict[str, float]:
    """The task's eval metrics over `batches` (global arrays)."""
    return Evaluator(trainer.task, trainer.eval_step, batches)(params)


def run(config, workdir: PathLike) -> tuple[State, list[dict]]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint). Returns (state, history).

    `history` is every metric record of the run so far, as written to `metrics.jsonl`.
    Raises `Preempted` after SIGTERM (a checkpoint is written first) and `NumericalError` on a
    non-finite loss or gradient with `train.nonfinite="stop"`; see `infra/errors.py`. The run
    holds the workdir's lock throughout (`infra.workdir`): one run per workdir.
    """
    process.setup()
    t0 = time.perf_counter()
    started = mesh_lib.initialize_distributed(config.distributed)
    init_s = time.perf_counter() - t0
    claim = _claim(workdir)
    events = EventLog(claim.path, jax.process_index(), defer=True)  # until the run is accepted
    events.record("start", at=process.start_time(), pid=os.getpid(),
                  host=socket.gethostname(), process_count=jax.process_count())
    if started:
        events.record("distributed_init", seconds=init_s)
    reason, refused = "finished", False
    try:
        return _run(config, claim.path, events)
    except BaseException as e:
        reason = type(e).__name__
        # bad input (exit 2) found before the run was accepted: it leaves no trace
        refused = isinstance(e, UserError) and e.exit_code == 2 and not events.accepted
        raise
    finally:
        if not refused:
            with contextlib.suppress(UserError):  # a full disk must not mask the original error
                events.record("exit", reason=reason)
                events.accept()
        events.close()
        claim.release()


def _claim(workdir: PathLike) -> workdir_lib.Claim:
    """Process 0 claims the workdir; the other processes of a run learn its verdict before they
    touch anything."""
    if jax.process_count() == 1:
        return workdir_lib.claim(workdir)
    from jax._src import distributed

    client, key = distributed.global_state.client, "infra/workdir_claim"
    if jax.process_index() == 0:
        try:
            claim = workdir_lib.claim(workdir)
        except UserError as e:
            client.key_value_set(key, str(e))
            raise
        client.key_value_set(key, "ok")
        return claim
    verdict = client.blocking_key_value_get(key, 600_000)
    if verdict != "ok":
        raise UserError(verdict)
    return workdir_lib.claim(workdir, lock=False)


def _run(config, workdir: PathLike, events: EventLog) -> tuple[State, list[dict]]:
    trainer = build(config)
    main_events = events if is_main_process() else None  # process 0's timeline is the run's
    evaluator = trainer.evaluator(main_events)
    ckpt = Checkpointer(workdir, **CheckpointConfig.from_config(config.checkpoint).to_dict(),
                        events=main_events, shared=trainer.frozen_params)
    heartbeat_s = DistributedConfig.from_config(config.distributed).heartbeat_timeout_s
    peers = PeerWatchdog(timeout_s=heartbeat_s * 2).start()
    clean = False
    try:
        with peers.failures_reported():
            result = _train(config, workdir, trainer, ckpt, evaluator, events)
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


def _kernel_flops(config, mesh) -> float:
    """Per device and step: the FLOPs of a fused attention kernel, which XLA's count misses."""
    from infra.plan.estimate import AnalyticTransformer

    model = AnalyticTransformer.from_config(config)
    if model is None:
        return 0.0
    per_token = uncounted_flops_per_token(model.config, model.T, mesh.devices.flat[0].platform)
    return per_token * model.rows * model.T / mesh.size


def _print_layout(config, trainer: Trainer) -> None:
    """The mesh, every parameter's sharding and what trains (stdout)."""
    print(mesh_lib.describe(trainer.mesh))
    print(sharding.sharding_table(trainer.state.abstract["params"],
                                  trainer.state.shardings["params"],
                                  ShardingConfig.from_config(config.sharding).warn_replicated_mb))
    print(trained_summary(trainer.state), flush=True)


def _resume_or_start(trainer: Trainer, ckpt: Checkpointer, workdir: PathLike,
                     events: EventLog | None = None) -> tuple[State, Any, bool]:
    """(state, data iterator, resumed): the newest intact checkpoint with the data position it
    saved, or a fresh start where starting over loses nothing (`workdir.check_fresh_start`),
    from the parameters of `init.from` or of the workdir's own parameters-only checkpoint (what
    `hf import` writes)."""
    t0, pid, pcount, task = time.perf_counter(), jax.process_index(), jax.process_count(), trainer.task
    make_iterator = lambda start: task.train_iterator(pid, pcount, start_step=start)  # noqa: E731
    # goodput: restoring a checkpoint is its own cost; creating a fresh state is start-up
    note = lambda step, fresh: events and events.record(  # noqa: E731
        "restore", step=step, fresh=fresh, seconds=0.0 if fresh else time.perf_counter() - t0)
    imported = init_from.params_only_checkpoint(workdir)
    restored = None if imported else ckpt.restore_latest(trainer.state.abstract, make_iterator)
    if restored is None:
        if not imported:
            workdir_lib.check_fresh_start(workdir)
        key = jax.random.key(trainer.config.train.seed)
        source = workdir if imported else init_from.source_of(trainer.config)
        if source:  # the source's parameters; adapters (LoRA) it cannot have start fresh
            base, _ = lora.split(trainer.state.abstract["params"])
            state = trainer.state.init_around(
                key, init_from.load_params(source, trainer.config, base))
        else:
            state = trainer.state.init(key)
        host_malloc.release()  # what reading the source's parameters freed
        note(0, True)
        return state, make_iterator(0), False
    state, meta, iterator = restored
    log.info("resumed from step %d in %s", meta["step"], ckpt.directory)
    note(int(meta["step"]), False)
    return state, iterator, True


def _train(config, workdir: PathLike, trainer: Trainer, ckpt: Checkpointer, evaluator: Callable,
           event_log: EventLog) -> tuple[State, list[dict]]:
    tc, task = TrainConfig.from_config(config.train), trainer.task
    events = event_log if is_main_process() else None  # process 0's timeline is the run's
    state, train_iter, resumed = _resume_or_start(trainer, ckpt, workdir, events)
    step, end = int(state["step"]), min(tc.steps, tc.stop_at or tc.steps)
    # Only now that config, data and checkpoint are known to be good does the run write into
    # the workdir: a refusal before this point leaves it as it was.
    event_log.accept()
    if is_main_process():
        config_lib.save(config, workdir)
        # after what can refuse the run: its one line is last
        if ShardingConfig.from_config(config.sharding).print_table:
            _print_layout(config, trainer)
    meta = {"config": config.to_dict(), "experiment": config.experiment}
    meter = ThroughputMeter(units_per_step=tc.batch_size * task.units_per_example(),
                            unit=task.unit, start_step=step, events=events,
                            uncounted_flops=_kernel_flops(config, trainer.mesh))
    guard = NonFiniteGuard(tc.nonfinite, ckpt.latest_step)
    profiler = ProfilerWindow(ProfileConfig.from_config(config.profile).steps,
                              workdir / "tensorboard")
    pending = PendingMetrics()
    with Reporter(workdir, task, total_steps=tc.steps, start_step=step if resumed else None,
                  enabled=is_main_process(), progress_bar=tc.progress_bar) as report, \
            preemption.sigterm_flag(tc.sigterm_grace_s) as sigterm:
        if step == 0 and tc.eval_at_start and not report.has_eval(0):
            report.log_eval(0, evaluator(state["params"]))
        while step < end:
            process.raise_if_interrupted()
            if task.rolls_out:  # the step's batch from the data's and the current policy
                local = meter.next_batch(train_iter, lambda b: b)
                batch, host_metrics = meter.rollout(lambda: task.prepare(local, trainer, state))
            else:
                batch, host_metrics = meter.next_batch(train_iter, trainer.to_global), {}
            train_step = meter.compiled(trainer.train_step, state, batch)
            profiler.before(step)
            state, metrics = train_step(state, batch)
            step += 1
            profiler.after(step, metrics)
            pending.append(step, metrics | host_metrics)
            pending.wait_for_previous()  # at most one step in flight: SIGTERM is seen in time
            last = step == end
            preempted = sigterm.raised or ckpt.reached_preemption(step)
            log_now = last or step % tc.log_every == 0
            save_now = last or preempted or ckpt.should_save(step)
            if log_now or save_now:  # a sync point: check every step since the last one
                guard.check(pending.fetch())
            if log_now:
                report.log_train(step, pending.pop_mean() | meter.lap(step))
            if last or step % tc.eval_every == 0:
                report.log_eval(step, evaluator(state["params"]))
            if save_now:
                ckpt.save(step, state, train_iter, meta)
            ckpt.poll_commits()
            if preempted and not last:
                meter.lap(step)  # the steps since the last log point, for goodput
                raise preemption.stopped(ckpt, step)
        ckpt.wait()
        report.log_goodput(step, workdir)
    return state, report.history
