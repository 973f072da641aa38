#!/usr/bin/env python
"""Train-step speed of the released `llama3.2-1b` config (bf16 compute, float32 params) on one
accelerator, per attention backend: one JSON line per figure.

    python scripts/bench_gpu.py                  # a GPU (or TPU): xla vs the fused kernel
    python scripts/bench_gpu.py --quick          # any machine, CPU included (what CI runs):
                                                 # the llama.py:smoke shape, 2 steps, xla only

Per backend (`model.attention`: xla, then auto's kernel: cudnn on GPU, splash on TPU): compile
time, median step time, tokens/s, MFU from XLA's cost-analysis FLOPs of the compiled step and
the chip's dense bf16 peak (`infra.hardware`), and the stricter model-FLOPs MFU (6N + 12·L·d·s
per token). XLA does not count the FLOPs inside a Pallas / cuDNN custom call, so a kernel's
`mfu_xla` undercounts: compare kernels by step time and `mfu_model`. Then the fastest kernel
with quantization-aware projections (`model.quantization`: fp8 with e5m2 gradients, int8; on
CPU, `--quick` runs fp8 only). Without an accelerator the full run exits with a one-line
message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(cfg, steps: int, warmup: int) -> dict:
    """Compile the train step of `cfg` and time `steps` of it after `warmup`."""
    import jax

    from infra import sharding, utilization
    from infra.train import build

    trainer = build(cfg, mesh=None)
    it = trainer.task.train_iterator(0, 1)
    batches = [sharding.to_global(next(it), trainer.batch_shardings) for _ in range(2)]
    state = trainer.state.init(jax.random.key(0))
    t0 = time.perf_counter()
    step = trainer.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(trainer.state.abstract["params"]))
    return {"compile_s": compile_s, "step_s": statistics.median(times), "params": int(n_params),
            "xla_flops_per_step": utilization.compiled_flops(step),
            "loss": float(metrics["loss"]),
            "peak_memory_gib": (utilization.peak_memory_bytes() or 0) / 2**30}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: runs on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--remat", default="save_dots", choices=("none", "full", "save_dots"),
                   help="activation recomputation (8 x 2048 without it exceeds 80 GB)")
    p.add_argument("--out", default="bench_gpu.jsonl")
    args = p.parse_args(argv)

    import jax

    from infra import config as config_lib
    from infra.hardware import detect_chip
    from infra.models.attention_kernels import resolve

    platform = jax.devices()[0].platform
    if not args.quick and platform not in ("gpu", "tpu"):
        sys.exit(f"bench_gpu.py: no GPU or TPU found (JAX sees {platform}); run it on a machine "
                 f"with one, or pass --quick")
    chip = detect_chip()
    if args.quick:
        spec, batch, seq, steps, warmup = "experiments/llama.py:smoke", 8, 64, 2, 1
    else:
        spec, batch, seq, steps, warmup = ("experiments/llama.py:llama3.2-1b", args.batch,
                                           args.seq, args.steps, args.warmup)
    kernel = resolve("auto", platform, "bfloat16")
    runs = [("xla", "none")] + ([(kernel, "none")] if kernel != "xla" else [])
    runs += [(kernel, "fp8")] + ([] if args.quick else [(kernel, "int8")])
    lines = []
    for backend, quantization in runs:
        cfg = config_lib.load(spec, overrides={
            "data.seq_len": seq, "model.max_seq_len": seq, "model.dtype": "bfloat16",
            "model.remat": "none" if args.quick else args.remat, "model.attention": backend,
            "model.quantization": quantization, "model.quantize_backward": quantization == "fp8",
            "train.batch_size": batch, "train.steps": 1000, "train.progress_bar": False,
            "mesh.data": 1, "mesh.fsdp": -1, "sharding.print_table": False})
        m = cfg.model
        figures = measure(cfg, steps, warmup)
        tokens = batch * seq
        model_flops = tokens * (6 * figures["params"]
                                + 12 * m.num_layers * m.num_heads * m.head_dim * seq)
        peak = chip.peak_flops if chip else None
        flops = figures["xla_flops_per_step"]
        lines.append({"figure": "train_step", "config": spec, "attention": backend,
                      "quantization": quantization,
                      "dtype": "bfloat16", "device": jax.devices()[0].device_kind,
                      "chip": chip.name if chip else None, "batch": batch, "seq": seq,
                      **figures, "tokens_per_s": tokens / figures["step_s"],
                      "model_flops_per_step": model_flops,
                      "mfu_xla": flops / figures["step_s"] / peak if flops and peak else None,
                      "mfu_model": model_flops / figures["step_s"] / peak if peak else None,
                      "jax": jax.__version__})
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
