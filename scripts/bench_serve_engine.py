"""The engine's own serving figures, in process (parts of `scripts/bench_serve.py`):

* paged vs dense: decode tokens/s with every slot active, the default paged cache (16-position
  pages) against one context-long page per slot (the dense layout), interleaved rounds.
* prefix caching: time to first token of a prompt whose first `prefix` tokens were seen
  before (their pages cached) against the same prompt computed from scratch.
* chunked prefill: the inter-token p99 (and longest gap) of 7 streams while three long prompts
  arrive, over the same streams alone, for several `prefill_chunk` sizes (the context: no
  chunking).
* batched prefill: time to first token of 8 short prompts arriving together, prefilled one
  per call and several per call.
* transformers: the same model exported (`hf export`) and run by transformers' batched greedy
  `generate` (left-padded) against the engine on the same prompts, in tokens/s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LONG_AT = (40, 100, 160)  # decode steps at which a long prompt arrives (chunked prefill)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paged_vs_dense(workdir: Path, slots: int = 8, steps: int = 100, rounds: int = 3) -> dict:
    from infra.serve.engine import Engine, SamplingParams

    engines = {"paged": Engine.from_workdir(workdir, slots=slots),
               "dense": Engine.from_workdir(workdir, slots=slots, page_size=10**9)}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.compile(buckets=[16])
        for s in range(slots):
            engine.insert(s, np.arange(1, 9, dtype=np.int32), SamplingParams())
    for _ in range(rounds):  # interleaved: both see the same machine load
        for name, engine in engines.items():
            for _ in range(steps):
                times[name].append(_timed(lambda: (engine.grow(), engine.step())))
    out = {}
    for name, t in times.items():
        step, median = float(np.min(t)), float(np.median(t))
        out[name] = {"step_ms": step * 1e3, "median_step_ms": median * 1e3,
                     "tokens_per_s": slots / step, "median_tokens_per_s": slots / median,
                     "cache_mib": engines[name].cache_bytes() / 2**20}
        print(f"{name:5s} decode, {slots} slots: step {step * 1e3:.2f} ms (median "
              f"{median * 1e3:.2f}), cache {out[name]['cache_mib']:.1f} MiB", flush=True)
    out["paged_over_dense_tokens_per_s"] = (out["paged"]["median_tokens_per_s"]
                                            / out["dense"]["median_tokens_per_s"])
    return out


def _ttft(scheduler, ids: np.ndarray) -> float:
    from infra.serve.scheduler import Request

    r = scheduler.submit(Request(ids, max_tokens=1))
    scheduler.run_until_idle()
    return r.first_token_at - r.arrived


def prefix_ttft(workdir: Path, prefix: int = 1000, trials: int = 3) -> dict:
    from infra.serve.engine import Engine
    from infra.serve.scheduler import Scheduler

    engine = Engine.from_workdir(workdir, slots=2)
    engine.compile()
    s = Scheduler(engine, engine.tokenizer)
    rng = np.random.default_rng(0)
    _ttft(s, rng.integers(1, 255, prefix + 8).astype(np.int32))  # warm every program
    cold, warm = [], []
    for _ in range(trials):
        shared = rng.integers(1, 255, prefix)
        cold.append(_ttft(s, np.concatenate([shared, rng.integers(1, 255, 8)]).astype(np.int32)))
        warm.append(_ttft(s, np.concatenate([shared, rng.integers(1, 255, 8)]).astype(np.int32)))
    out = {"prefix_tokens": prefix, "first_use_ttft_ms": float(np.median(cold)) * 1e3,
           "second_use_ttft_ms": float(np.median(warm)) * 1e3}
    out["speedup"] = out["first_use_ttft_ms"] / out["second_use_ttft_ms"]
    print(f"prefix of {prefix} tokens: TTFT {out['first_use_ttft_ms']:.1f} ms first use, "
          f"{out['second_use_ttft_ms']:.1f} ms second (x{out['speedup']:.1f})", flush=True)
    return out


def batched_prefill(workdir: Path, burst: int = 8, prompt: int = 12, trials: int = 5) -> list[dict]:
    """TTFT of `burst` short prompts arriving together (8 slots, nothing else running): one
    prompt per prefill call against several in one call, at the default `prefill_chunk` (64
    on CPU: 4 rows of 16 tokens) and at 128 (8 rows)."""
    from infra.serve.engine import Engine
    from infra.serve.scheduler import Request, Scheduler

    rng = np.random.default_rng(2)
    rows = []
    for chunk, prefill_rows in ((None, 1), (None, 8), (128, 1), (128, 8)):
        engine = Engine.from_workdir(workdir, slots=burst, prefill_chunk=chunk,
                                     prefill_rows=prefill_rows)
        engine.compile()
        s = Scheduler(engine, engine.tokenizer)
        ttft, last = [], []
        for trial in range(trials + 1):  # the first warms every program
            requests = s.submit_all([Request(rng.integers(1, 255, prompt).astype(np.int32),
                                             max_tokens=1) for _ in range(burst)])
            s.run_until_idle()
            if trial:
                times = [r.first_token_at - r.arrived for r in requests]
                ttft.append(float(np.median(times)))
                last.append(max(times))
        row = {"prefill_chunk": engine.prefill_chunk, "prefill_rows": engine.prefill_rows,
               "median_ttft_ms": float(np.median(ttft)) * 1e3,
               "last_ttft_ms": float(np.median(last)) * 1e3}
        rows.append(row)
        print(f"{burst} prompts of {prompt} tokens at once, prefill_chunk {row['prefill_chunk']}, "
              f"{row['prefill_rows']} per call: TTFT median {row['median_ttft_ms']:.1f} ms, "
              f"last {row['last_ttft_ms']:.1f} ms", flush=True)
    return rows


def chunked_itl(workdir: Path, chunks: list[int], long_prompt: int = 1500,
                streams: int = 7, tokens: int = 200) -> list[dict]:
    from infra.serve.engine import Engine
    from infra.serve.scheduler import Metrics, Request, Scheduler

    class Gaps(Metrics):
        def __init__(self):
            self.gaps: list[float] = []

        def inter_token(self, seconds: float) -> None:
            self.gaps.append(seconds)

    rows = []
    rng = np.random.default_rng(1)
    for chunk in chunks:
        engine = Engine.from_workdir(workdir, slots=streams + 1, prefill_chunk=chunk)
        engine.compile()
        p99, worst = {}, {}
        for with_long in (False, True, False, True):  # twice each, interleaved; the last counts
            metrics, longs = Gaps(), []
            s = Scheduler(engine, engine.tokenizer, metrics=metrics)
            for _ in range(streams):
                s.submit(Request(rng.integers(1, 255, 8).astype(np.int32), max_tokens=tokens,
                                 ignore_eos=True))
            for step in range(tokens + 2):
                if with_long and step in LONG_AT:
                    longs.append(s.submit(Request(
                        rng.integers(1, 255, long_prompt).astype(np.int32), max_tokens=1)))
                s.step()
            s.run_until_idle()
            p99[with_long] = float(np.percentile(metrics.gaps, 99))
            worst[with_long] = float(np.max(metrics.gaps))
            ttft = [r.first_token_at - r.arrived for r in longs]
        rows.append({"prefill_chunk": chunk, "itl_p99_ms_alone": p99[False] * 1e3,
                     "itl_p99_ms_with_long_prompts": p99[True] * 1e3,
                     "ratio": p99[True] / p99[False], "itl_max_ms_alone": worst[False] * 1e3,
                     "itl_max_ms_with_long_prompts": worst[True] * 1e3,
                     "long_prompt_ttft_ms": float(np.median(ttft)) * 1e3})
        print(f"prefill_chunk {chunk}: inter-token p99 {p99[False] * 1e3:.2f} ms alone, "
              f"{p99[True] * 1e3:.2f} ms with {len(LONG_AT)} {long_prompt}-token prompts "
              f"arriving (x{p99[True] / p99[False]:.2f}); longest gap {worst[False] * 1e3:.1f} "
              f"-> {worst[True] * 1e3:.1f} ms; their TTFT {np.median(ttft) * 1e3:.0f} ms",
              flush=True)
    return rows


def transformers_baseline(workdir: Path, export: Path, slots: int = 8,
                          new_tokens: int = 128) -> dict:
    import torch
    import transformers

    from infra.serve.engine import Engine
    from infra.serve.scheduler import Request, Scheduler

    subprocess.run([sys.executable, "-m", "infra", "hf", "export", "--workdir", str(workdir),
                    "--out", str(export)], cwd=ROOT, check=True, capture_output=True)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 255, int(n)).astype(np.int32) for n in rng.integers(8, 121, slots)]
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.zeros((slots, width), dtype=torch.long)
    mask = torch.zeros((slots, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1

    def hf():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + new_tokens

    engine = Engine.from_workdir(workdir, slots=slots)
    engine.compile()

    def ours():
        s = Scheduler(engine, engine.tokenizer)
        for p in prompts:
            s.submit(Request(p, max_tokens=new_tokens, ignore_eos=True))
        s.run_until_idle()

    hf(), ours()  # warm
    t_hf, t_ours = [], []
    for _ in range(3):  # interleaved
        t_hf.append(_timed(hf))
        t_ours.append(_timed(ours))
    total = slots * new_tokens
    out = {"requests": slots, "new_tokens": new_tokens, "torch_threads": torch.get_num_threads(),
           "transformers_tokens_per_s": total / float(np.median(t_hf)),
           "engine_tokens_per_s": total / float(np.median(t_ours))}
    out["engine_over_transformers"] = out["engine_tokens_per_s"] / out["transformers_tokens_per_s"]
    print(f"{slots} prompts x {new_tokens} greedy tokens: transformers "
          f"{out['transformers_tokens_per_s']:.0f} tok/s, engine {out['engine_tokens_per_s']:.0f} "
          f"tok/s (x{out['engine_over_transformers']:.1f})", flush=True)
    return out
