"""How fast is the loop: compile time, FLOPs, step time, throughput, MFU and input wait."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from infra import host_malloc, utilization


class ThroughputMeter:
    """Times the loop between `lap`s and reports per-step figures.

    `compiled` compiles the step ahead of time on its first call and restarts the clock, so the
    first interval's step time excludes compilation (and the first batch's wait);
    `next_batch` measures the time spent waiting for input, and the time an RL task spends
    making the step's batch from it with the current policy (`rollout`: generation, reference
    log-probabilities).
    """

    def __init__(self, *, units_per_step: int, unit: str, start_step: int = 0,
                 peak: Callable[[], tuple[float | None, str]] = utilization.peak_flops_per_device,
                 clock: Callable[[], float] = time.perf_counter, events=None,
                 uncounted_flops: float = 0.0):
        """`uncounted_flops`: per device and step, what XLA's count of the compiled step misses
        (a fused attention kernel's, `infra.models.attention.uncounted_flops_per_token`)."""
        self.units_per_step, self.unit = units_per_step, unit
        self._uncounted = uncounted_flops
        self._peak_fn, self._clock = peak, clock
        self.events = events  # `infra.events.EventLog`: compile, loop start, step intervals
        self._compiled = None
        self.compile_s: float | None = None
        self.flops: float | None = None  # per device per step (XLA's count + uncounted)
        self.peak: float | None = None  # FLOP/s of one device
        self._waited = 0.0
        self._rollout: float | None = None  # seconds in `prepare` since the last lap
        self._t_last = self._clock()
        self._step_last = start_step
        self._first_lap = True

    def next_batch(self, iterator: Iterator, to_global: Callable[[Any], Any]) -> Any:
        """The next global batch, timing how long the loop waited for it."""
        t0 = self._clock()
        batch = to_global(next(iterator))
        self._waited += self._clock() - t0
        return batch

    def rollout(self, prepare: Callable[[], Any]) -> Any:
        """`prepare()` (an RL task's batch from the current policy), timed as rollout."""
        t0 = self._clock()
        out = prepare()
        self._rollout = (self._rollout or 0.0) + self._clock() - t0
        return out

    def compiled(self, jitted, *args) -> Any:
        """`jitted` compiled for `args` (once; later calls return the same executable)."""
        if self._compiled is None:
            t0 = self._clock()
            self._compiled = jitted.lower(*args).compile()
            host_malloc.release()  # the compiler's memory, freed but kept by the heap
            self.compile_s = self._clock() - t0
            counted = utilization.compiled_flops(self._compiled)
            self.flops = counted + self._uncounted if counted else None
            self.peak, _ = self._peak_fn()
            self._t_last, self._waited = self._clock(), 0.0
            self._rollout = None if self._rollout is None else 0.0
            if self.events is not None:
                self.events.record("compile", seconds=self.compile_s)
                self.events.record("loop_start", step=self._step_last)
        return self._compiled

    def lap(self, step: int) -> dict[str, float]:
        """Figures per step since the last lap (or the start), then start a new interval; {} when
        no step ran since."""
        if step <= self._step_last:
            return {}
        interval = self._clock() - self._t_last
        seconds = interval / max(step - self._step_last, 1)
        out = {
            "step_time_s": seconds,
            f"{self.unit}_per_sec": self.units_per_step / seconds,
            "input_wait_frac": self._waited / interval if interval > 0 else 0.0,
        }
        if self._rollout is not None:
            out["rollout_frac"] = self._rollout / interval if interval > 0 else 0.0
        if self.flops:
            out["flops_per_step"] = self.flops * jax.device_count()
            out["flops_per_sec_per_device"] = self.flops / seconds
            if self.peak:
                out["mfu"] = self.flops / seconds / self.peak
        if (memory := utilization.peak_memory_bytes()) is not None:
            out["peak_memory_gib"] = memory / 2**30
        out["peak_host_memory_gib"] = utilization.peak_host_memory_bytes() / 2**30
        if self._first_lap and self.compile_s is not None:
            out["compile_time_s"], self._first_lap = self.compile_s, False
        if self.events is not None:
            extra = {} if self._rollout is None else {"rollout_s": self._rollout}
            self.events.record("steps", first=self._step_last + 1, last=step, seconds=interval,
                               input_wait_s=self._waited, **extra)
        self._t_last, self._step_last, self._waited = self._clock(), step, 0.0
        self._rollout = None if self._rollout is None else 0.0
        return out
