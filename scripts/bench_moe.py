#!/usr/bin/env python
"""Mixture-of-experts step time on 1 CPU device: `lm.py:moe-tiny` (8 experts of 384, top 2),
dropless and dropping (capacity factor 1.25), against `lm.py:tiny` (a dense MLP of 768: the
same active parameters but the router's 8K).

    python scripts/bench_moe.py [--steps 20] [--out docs/bench_moe.json]

Each model's compiled train step (`infra.train.build`, as the loop runs it) is timed on the
same batches; the three are interleaved step by step so that load from other processes hits
them alike; medians after 2 warm-up steps. Prints one JSON line per model and the ratios, with
the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"dense": ("experiments/lm.py:tiny", {}),
          "moe_dropless": ("experiments/lm.py:moe-tiny", {}),
          "moe_dropping": ("experiments/lm.py:moe-tiny", {"model.capacity_factor": 1.25})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = p.parse_args()
    from infra import mesh as mesh_lib
    from infra import process

    process.setup()
    mesh_lib.emulate_cpu_devices(1)
    import jax

    from infra import config as config_lib
    from infra import sharding
    from infra.models import hyper_params
    from infra.train import build

    load_before = os.getloadavg()[0]
    runs = {}
    for name, (spec, overrides) in MODELS.items():
        cfg = config_lib.load(spec, {"train.progress_bar": False, "mesh.data": -1,
                                     "sharding.print_table": False, **overrides})
        trainer = build(cfg)
        it = trainer.task.train_iterator(0, 1)
        batches = [sharding.to_global(next(it), trainer.batch_shardings) for _ in range(4)]
        state = trainer.state.init(jax.random.key(0))
        step = trainer.train_step.lower(state, batches[0]).compile()
        m = hyper_params(cfg.model)
        runs[name] = {"step": step, "state": state, "batches": batches, "times": [],
                      "params": m.num_params, "active_params": m.active_params}
    for i in range(args.steps + 2):
        for name, run in runs.items():
            start = time.perf_counter()
            run["state"], _ = run["step"](run["state"], run["batches"][i % 4])
            jax.block_until_ready(run["state"])
            if i >= 2:
                run["times"].append(time.perf_counter() - start)
    out = {"load_average": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count()}
    for name, run in runs.items():
        out[name] = {"median_step_ms": statistics.median(run["times"]) * 1e3,
                     "min_step_ms": min(run["times"]) * 1e3, "params": run["params"],
                     "active_params": run["active_params"]}
        print(json.dumps({"model": name, **out[name]}), flush=True)
    dense = out["dense"]["median_step_ms"]
    out["dropless_over_dense"] = out["moe_dropless"]["median_step_ms"] / dense
    out["dropping_over_dense"] = out["moe_dropping"]["median_step_ms"] / dense
    print(json.dumps({k: out[k] for k in ("dropless_over_dense", "dropping_over_dense",
                                          "load_average")}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
