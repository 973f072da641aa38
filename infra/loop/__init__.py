"""The parts the training loop is made of, one concern each (`infra.train` strings them together).

| part | concern |
|---|---|
| `throughput.ThroughputMeter` | compile once ahead of time; compile time, FLOPs, step time, throughput, MFU, input wait |
| `pending.PendingMetrics` | per-step metrics left on the devices until a sync point, fetched in one transfer |
| `nonfinite.NonFiniteGuard` | NaN/Inf loss, gradients or updates: stop with a clear error, or warn and go on |
| `profiler.ProfilerWindow` | a `jax.profiler` trace of a window of steps |
| `frozen_step.FrozenStep` | a partly trained model's (LoRA) step: the frozen weights not donated, so saves need not copy them |
| `evaluator.Evaluator` | the task's eval metrics over the held-out batches (also used by `infra.evaluate`) |
| `reporter.Reporter` | train / eval records to `metrics.jsonl`, TensorBoard and the progress bar; the history |
| `preemption` | SIGTERM between steps; stopping with a committed checkpoint |

Each part is small, owns its state and is unit-tested in-process (`tests/test_loop_parts.py`).
"""
