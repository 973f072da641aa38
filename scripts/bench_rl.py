"""GRPO rollouts: the engine in the training process vs the same engine behind the HTTP server,
and how a GRPO step's time splits between rollout and update. Quoted in docs/benchmarks.md
("Reinforcement learning").

    python scripts/bench_rl.py                      # trains the arith-sft start first (~1 min)
    python scripts/bench_rl.py --workdir runs/arith-sft

Both sides: the `experiments/grpo.py:arith` model (byte-level, 0.8M parameters) restored from
the SFT workdir, 1 CPU device, `--prompts` held-out addition prompts x `--generations`
completions, temperature 1, at most `--max_tokens` new tokens, as many slots as completions.
In process: `GRPOTask.rollout` (parameters synced into the engine, continuous batching, the
group's prompt pages shared). Over HTTP: `python -m infra serve` on loopback, one
`/v1/completions` request per prompt with `n` = generations, all sent at once with the
`openai` client. Each side runs once to compile, then `--repeats` times; output tokens/s is
completion tokens / wall time (median). The split of a step: `train/rollout_frac` of a
`--steps`-step GRPO run from the same start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def train(config: str, workdir: Path, *extra: str) -> None:
    env = {**os.environ, "INFRA_CPU_DEVICES": "1"}
    subprocess.run([sys.executable, "-m", "infra", "train", "--config", config, "--workdir",
                    str(workdir), "--config.sharding.print_table=false",
                    "--config.train.progress_bar=false", *extra],
                   cwd=ROOT, env=env, check=True, capture_output=True)


def in_process(workdir: Path, prompts: int, generations: int, max_tokens: int,
               repeats: int) -> dict:
    import jax
    import numpy as np

    from infra import config, train as train_lib
    from infra.interop import init_from

    cfg = config.load("experiments/grpo.py:arith", {
        "init.from": str(workdir), "rl.num_generations": generations,
        "rl.max_new_tokens": max_tokens, "train.batch_size": prompts})
    trainer = train_lib.build(cfg)
    params = init_from.load_params(str(workdir), cfg, trainer.state.abstract["params"])
    task = trainer.task
    records, ids = task.prompts["eval"]
    records = [r for r in records[:prompts] for _ in range(generations)]
    ids = [x for x in ids[:prompts] for _ in range(generations)]
    seeds = np.arange(len(ids))
    times, tokens = [], 0
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = task.rollout(trainer, params, records, ids, seeds + i)
        if i:
            times.append(time.perf_counter() - t0)
            tokens = out["tokens"]
    del jax
    seconds = statistics.median(times)
    prompts_used = [list(map(int, x)) for x in task.prompts["eval"][1][:prompts]]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "prompt_ids": prompts_used}


async def _burst(url: str, prompts: list[list[int]], generations: int, max_tokens: int,
                 seed: int) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    calls = [client.completions.create(model="bench", prompt=p, n=generations,
                                       max_tokens=max_tokens, temperature=1.0, seed=seed + i)
             for i, p in enumerate(prompts)]
    answers = await asyncio.gather(*calls)
    await client.close()
    return sum(a.usage.completion_tokens for a in answers)


def over_http(workdir: Path, ids: list[list[int]], generations: int, max_tokens: int,
              repeats: int) -> dict:
    from bench_serve import ServerProcess

    server = ServerProcess(workdir, False, len(ids) * generations)
    try:
        times, tokens = [], 0
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            n = asyncio.run(_burst(server.url, ids, generations, max_tokens, 1000 * i))
            if i:
                times.append(time.perf_counter() - t0)
                tokens = n
    finally:
        server.stop()
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def step_split(workdir: Path, tmp: Path, steps: int) -> dict:
    out = tmp / "grpo"
    train("experiments/grpo.py:arith", out, f"--config.init.from={workdir}",
          f"--config.train.steps={steps}", f"--config.train.log_every={steps // 2}",
          f"--config.train.eval_every={steps}", "--config.train.eval_at_start=false")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/rollout_frac" in r][-1]  # the second interval: compiled
    return {"rollout_frac": last["train/rollout_frac"], "step_time_s": last["train/step_time_s"],
            "rollout_tokens_per_s": last["train/rollout_tokens_per_sec"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="an experiments/grpo.py:arith-sft workdir")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_rl.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp) / "sft"
        if not args.workdir:
            train("experiments/grpo.py:arith-sft", workdir)
        shape = (args.generations, args.max_tokens, args.repeats)
        inside = in_process(workdir, args.prompts, *shape)
        ids = inside.pop("prompt_ids")
        result = {"prompts": args.prompts, "generations": args.generations,
                  "max_tokens": args.max_tokens, "in_process": inside,
                  "http": over_http(workdir, ids, *shape),
                  "grpo_step": step_split(workdir, Path(tmp), args.steps)}
    result["in_process_vs_http"] = (result["in_process"]["tokens_per_s"]
                                    / result["http"]["tokens_per_s"])
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
