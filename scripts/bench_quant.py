"""Quantization-aware training against float32 on `experiments/lm.py:tiny`: the same run (seed,
data, steps) with `model.quantization` = none, int8 and fp8 (e4m3 forward, e5m2 gradients);
the final eval loss of each, and the first step's logits (the initial weights through the
quantized and the float products). Quoted in README ("Kernels and low precision").

    python scripts/bench_quant.py                 # 200 steps each: ~15 min on a 2-core CPU
    python scripts/bench_quant.py --steps 30 --config experiments/lm.py:smoke

One JSON line per mode (and `--out`): eval loss, its relative difference from float32, the
logits' relative difference (norm), seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

MODES = {"none": {}, "int8": {"model.quantization": "int8"},
         "fp8": {"model.quantization": "fp8", "model.quantize_backward": True}}


def first_step_logits(config, tokens):
    """The initial model's logits (seed `train.seed`) for `tokens`."""
    import jax

    from infra.train import build

    trainer = build(config)
    state = trainer.state.init(jax.random.key(int(config.train.seed)))
    return trainer.state.model.merge(state["params"])(tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/lm.py:tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="docs/bench_quant.json")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from infra import config as config_lib
    from infra import train

    lines, reference = [], {}
    for mode, overrides in MODES.items():
        config = config_lib.load(args.config, {
            **overrides, "train.steps": args.steps, "train.eval_every": args.steps,
            "checkpoint.every": args.steps, "train.progress_bar": False,
            "sharding.print_table": False})
        tokens = jax.random.randint(jax.random.key(1), (4, int(config.data.seq_len)), 0,
                                    int(config.model.vocab_size))
        logits = first_step_logits(config, tokens)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            _, events = train.run(config, workdir)
        loss = [e["eval/loss"] for e in events if "eval/loss" in e][-1]
        if mode == "none":
            reference = {"loss": loss, "logits": logits}
        line = {"config": args.config, "steps": args.steps, "quantization": mode,
                "eval_loss": loss, "seconds": round(time.perf_counter() - start, 1),
                "eval_loss_vs_float32": loss / reference["loss"] - 1,
                "first_logits_vs_float32": float(jnp.linalg.norm(logits - reference["logits"])
                                                 / jnp.linalg.norm(reference["logits"]))}
        lines.append(line)
        print(json.dumps(line), flush=True)
    Path(args.out).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
