#!/usr/bin/env python
"""MFU of `experiments/lm.py:1b` (bf16 compute, float32 params) on one GPU.

    python scripts/bench_gpu.py [--batch 8] [--seq 2048] [--steps 10] [--remat save_dots] [--out bench_gpu.json]

MFU = XLA cost-analysis FLOPs of the compiled train step / median step time / the chip's dense
bf16 peak from `infra.hardware.detect_chip()` (A100, H100, H200). XLA counts the recomputed
work of `--remat` too, so the figure printed alongside from 6·N + 12·L·d·s FLOPs per token (the
PaLM model-FLOPs formula) is the stricter one. Exits with a one-line message without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--remat", default="save_dots", choices=("none", "full", "save_dots"),
                   help="activation recomputation (8 x 2048 without it exceeds 80 GB)")
    p.add_argument("--out", default="bench_gpu.json")
    args = p.parse_args(argv)

    import jax

    if jax.devices()[0].platform != "gpu":
        sys.exit(f"bench_gpu.py: no GPU found (JAX sees {jax.devices()[0].platform}); "
                 f"run it on a machine with an NVIDIA GPU")

    from infra import config as config_lib
    from infra import sharding, utilization
    from infra.hardware import detect_chip
    from infra.train import build

    chip = detect_chip()
    if chip is None:
        sys.exit(f"bench_gpu.py: no peak FLOP/s known for '{jax.devices()[0].device_kind}'")
    cfg = config_lib.load("experiments/lm.py:1b", overrides={
        "data.seq_len": args.seq, "model.max_seq_len": args.seq, "model.remat": args.remat,
        "train.batch_size": args.batch, "train.steps": 1000, "train.progress_bar": False,
        "mesh.data": 1, "mesh.fsdp": -1, "sharding.print_table": False,
    })
    trainer = build(cfg, mesh=None)
    it = trainer.task.train_iterator(0, 1)
    batches = [sharding.to_global(next(it), trainer.batch_shardings) for _ in range(4)]
    state = trainer.state.init(jax.random.key(0))
    t0 = time.perf_counter()
    step = trainer.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    flops = utilization.compiled_flops(step)

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    m = cfg.model
    n_params = sum(x.size for x in jax.tree.leaves(trainer.state.abstract["params"]))
    tokens = args.batch * args.seq
    model_flops = tokens * (6 * n_params + 12 * m.num_layers * m.num_heads * m.head_dim * args.seq)
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": jax.devices()[0].device_kind, "chip": chip.name, "peak_flops": chip.peak_flops,
        "params": int(n_params), "batch": args.batch, "seq": args.seq, "remat": args.remat,
        "compile_s": compile_s, "step_s": step_s, "step_times_s": times,
        "tokens_per_s": tokens / step_s,
        "xla_flops_per_step": flops,
        "mfu_xla": flops / step_s / chip.peak_flops if flops else None,
        "model_flops_per_step": model_flops,
        "mfu_model": model_flops / step_s / chip.peak_flops,
        "loss": float(metrics["loss"]),
        "peak_memory_gib": (utilization.peak_memory_bytes() or 0) / 2**30,
        "jax": jax.__version__,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{chip.name}: {n_params / 1e9:.2f}B params, {args.batch}x{args.seq} tokens, remat={args.remat}: "
          f"{step_s:.3f} s/step, {out['tokens_per_s']:,.0f} tokens/s, MFU {out['mfu_xla'] or float('nan'):.3f} (XLA FLOPs), "
          f"{out['mfu_model']:.3f} (6N+12Lds); peak memory {out['peak_memory_gib']:.1f} GiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
