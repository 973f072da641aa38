"""The training loop's parts (infra/loop/), each on its own, in-process."""

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infra import process
from infra.errors import NumericalError, Preempted
from infra.loop import preemption
from infra.loop.evaluator import Evaluator
from infra.loop.nonfinite import NonFiniteGuard
from infra.loop.pending import PendingMetrics
from infra.loop.profiler import ProfilerWindow
from infra.loop.reporter import Reporter
from infra.loop.throughput import ThroughputMeter
from infra.tasks.base import Task


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeCompiled:
    def cost_analysis(self):
        return {"flops": 4.0e9}


class FakeJitted:
    """What `jax.jit(...)` offers the meter: lower(...).compile()."""

    def __init__(self, clock, compile_s):
        self.clock, self.compile_s, self.compiles = clock, compile_s, 0

    def lower(self, *args):
        return self

    def compile(self):
        self.compiles += 1
        self.clock.now += self.compile_s
        return FakeCompiled()


def test_throughput_meter_excludes_compile_and_first_wait_and_reports_mfu():
    clock = Clock()
    meter = ThroughputMeter(units_per_step=1000, unit="tokens", start_step=10,
                            peak=lambda: (2.0e10, "test"), clock=clock)

    def slow_batches():
        while True:
            clock.now += 0.5  # the input pipeline takes 0.5 s per batch
            yield {"x": 1}

    it = slow_batches()
    jitted = FakeJitted(clock, compile_s=30.0)
    meter.next_batch(it, lambda b: b)
    assert meter.compiled(jitted, "state", "batch") is meter.compiled(jitted, "state", "batch")
    assert jitted.compiles == 1 and meter.compile_s == 30.0
    clock.now += 1.5  # step 11
    for _ in range(3):  # steps 12-14: 0.5 s waiting + 1.5 s computing each
        meter.next_batch(it, lambda b: b)
        clock.now += 1.5
    out = meter.lap(14)
    assert out["step_time_s"] == pytest.approx(7.5 / 4)
    assert out["tokens_per_sec"] == pytest.approx(1000 / (7.5 / 4))
    assert out["input_wait_frac"] == pytest.approx(1.5 / 7.5)
    assert out["flops_per_step"] == pytest.approx(4.0e9 * jax.device_count())
    assert out["mfu"] == pytest.approx(4.0e9 / (7.5 / 4) / 2.0e10)
    assert out["compile_time_s"] == 30.0
    assert 0.01 < out["peak_host_memory_gib"] < 1024  # this process's resident peak
    clock.now += 2.0
    again = meter.lap(15)
    assert again["step_time_s"] == pytest.approx(2.0) and "compile_time_s" not in again
    assert again["input_wait_frac"] == 0.0
    # a fused attention kernel's FLOPs, which XLA's count misses, are added to it
    kernel = ThroughputMeter(units_per_step=1000, unit="tokens", peak=lambda: (2.0e10, "test"),
                             clock=clock, uncounted_flops=1.0e9)
    kernel.compiled(FakeJitted(clock, compile_s=1.0), "state", "batch")
    clock.now += 1.0
    assert kernel.lap(1)["mfu"] == pytest.approx(5.0e9 / 1.0 / 2.0e10)


def test_pending_metrics_fetch_once_and_average():
    pending = PendingMetrics()
    for step in (1, 2):
        pending.append(step, {"loss": jnp.float32(step), "skipped": jnp.float32(0)})
    first = pending.fetch()
    assert [s for s, _ in first] == [1, 2] and isinstance(first[0][1]["loss"], np.ndarray)
    pending.append(3, {"loss": jnp.float32(6.0), "skipped": jnp.float32(0)})
    assert [s for s, _ in pending.fetch()] == [3]  # only what was not fetched before
    assert pending.fetch() == []
    assert pending.pop_mean() == {"loss": 3.0, "skipped": 0.0}
    pending.append(4, {"loss": jnp.float32(1.0), "skipped": jnp.float32(0)})
    assert pending.pop_mean()["loss"] == 1.0  # cleared by the previous pop


def test_nonfinite_guard_stops_naming_the_step_or_warns(caplog):
    records = [(5, {"loss": 1.0, "grad_norm": 2.0, "skipped": 0.0}),
               (6, {"loss": float("nan"), "grad_norm": float("inf"), "skipped": 1.0})]
    NonFiniteGuard("stop", lambda: 4).check(records[:1])  # finite: nothing happens
    with pytest.raises(NumericalError) as info:
        NonFiniteGuard("stop", lambda: 4).check(records)
    message = str(info.value)
    assert message.startswith("non-finite loss, gradients or update at step 6 (loss=nan, grad_norm=inf)")
    assert "latest: step 4" in message and "train.nonfinite=skip" in message
    assert "--config" not in message and "--config.train.nonfinite=skip" in info.value.cli_message()
    with pytest.raises(NumericalError, match=r"no checkpoint holds it \(no checkpoint yet\)"):
        NonFiniteGuard("stop", lambda: None).check(records)  # it said "latest: step None"
    with caplog.at_level("WARNING"):
        NonFiniteGuard("skip", lambda: 4).check(records)
    assert "non-finite loss, gradients or update at step 6" in caplog.text and "update skipped" in caplog.text


def test_profiler_window_traces_exactly_its_steps(tmp_path):
    window = ProfilerWindow((2, 3), tmp_path)
    f = jax.jit(lambda x: x * 2)
    x = jnp.ones(4)
    for step in range(4):  # `step` steps done; run step + 1
        window.before(step)
        x = f(x)
        window.after(step + 1, x)
    traces = list(tmp_path.rglob("*.xplane.pb"))
    assert len(traces) == 1, traces
    ProfilerWindow((), tmp_path / "off").before(0)  # no window: nothing started
    assert not (tmp_path / "off").exists()


class _MeanTask(Task):
    def build_model(self, rngs):
        raise NotImplementedError

    def loss_fn(self, model, batch, rng):
        raise NotImplementedError

    def train_iterator(self, *args, **kwargs):
        raise NotImplementedError

    def eval_batches(self, *args):
        raise NotImplementedError

    def batch_axes(self):
        return {}


def test_evaluator_runs_every_batch_and_summarizes_on_the_host():
    batches = [{"x": jnp.arange(4.0)}, {"x": jnp.arange(4.0) + 4}]
    step = jax.jit(lambda params, b: {"loss": jnp.mean(b["x"] * params)})
    metrics = Evaluator(_MeanTask(None), step, batches)(jnp.float32(2.0))
    assert metrics == {"loss": pytest.approx((3.0 + 11.0) / 2)}


def test_reporter_writes_records_and_keeps_the_history(tmp_path):
    task = _MeanTask(None)
    task.unit, task.headline_metrics = "tokens", ("loss",)
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "train/loss": 2.0}) + "\n" + json.dumps({"step": 9, "train/loss": 1.0}) + "\n")
    with Reporter(tmp_path, task, total_steps=10, start_step=5, enabled=True,
                  progress_bar=False) as report:
        assert report.history == [{"step": 5, "train/loss": 2.0}]  # step 9 was not checkpointed
        report.log_train(6, {"loss": 1.5, "tokens_per_sec": 10.0})
        report.log_eval(6, {"loss": 1.25, "accuracy": float("nan")})
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == report.history == [
        {"step": 5, "train/loss": 2.0},
        {"step": 6, "train/loss": 1.5, "train/tokens_per_sec": 10.0},
        {"step": 6, "eval/loss": 1.25, "eval/accuracy": None}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    other = Reporter(tmp_path / "other", task, total_steps=10, start_step=0, enabled=False,
                     progress_bar=False)
    other.log_train(1, {"loss": 1.0, "tokens_per_sec": 1.0})
    other.close()
    assert not (tmp_path / "other").exists()  # only process 0 writes
    assert other.history == [{"step": 1, "train/loss": 1.0, "train/tokens_per_sec": 1.0}]


def test_sigterm_sets_the_flag_between_steps_and_stopping_waits_for_the_checkpoint():
    with process.SigtermFlag() as flag:
        assert not flag.raised
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.raised
    assert signal.getsignal(signal.SIGTERM) is not flag._handle  # restored

    class Checkpointer:
        directory = Path("/w/checkpoints")
        waited = False

        def wait(self):
            self.waited = True

    ckpt = Checkpointer()
    error = preemption.stopped(ckpt, 7)
    assert ckpt.waited and isinstance(error, Preempted)
    assert "stopped at step 7" in str(error) and "/w/checkpoints/7" in str(error)
