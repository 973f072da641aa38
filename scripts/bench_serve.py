"""Serving figures on this machine: a load sweep against the live server, continuous vs static
batching, the KV-cache engine vs the old no-cache `generate`, decode tokens/s vs slots against
the memory-bandwidth bound. Results: JSON + PNG (default `docs/bench_serve.{json,png}`),
quoted in docs/benchmarks.md ("Serving").

    python scripts/bench_serve.py                 # everything, ~10 min on 2 cores
    python scripts/bench_serve.py --quick         # fewer rates and requests (a smoke run)
    python scripts/bench_serve.py --parts paged,prefix,chunked,transformers  # the engine's own

Model: `lm.py:tiny`'s shape (3.4M parameters, byte-level, d_model 256, 4 layers, GQA 4/2)
with a 512-token context, trained for 1 step (the weights do not matter for speed; greedy
output of such a model is ASCII, so every token streams as one chunk). 1 CPU device.

* Load sweep (`--rates`): open-loop Poisson arrivals (exponential gaps, seeded) of
  `--requests_per_rate` requests at each rate, against `python -m infra serve` on loopback
  (8 slots), each a streamed `/v1/completions` with `ignore_eos` so it produces exactly its
  output length. Prompt lengths are uniform on [8, 120] tokens (random byte ids), output lengths
  uniform on [16, 128] tokens. Per rate: output tokens/s (over the time from the first arrival
  to the last completion), TTFT, inter-token latency (ITL: gaps between streamed chunks) and
  end-to-end latency, p50 and p99, as vLLM's benchmark defines them. The highest rate whose p99
  TTFT meets `--ttft_p99_target` (s) is reported for each mode; the comparison of the modes is
  their throughput at that rate ("goodput").
* Static batching: the same server with `--static` (a batch of up to 8 runs to completion
  before the next is admitted), same arrivals.
* Cache vs no cache: one request, a 16-token prompt and 256 new tokens (greedy), with the
  engine (1 slot) and with the old `generate` sampler (the whole context recomputed per token,
  one jitted while-loop; copied below from the code it replaced), in this process.
* Decode vs slots: the compiled decode step with every slot active, slots 1..16, tokens/s; next
  to it the memory-bandwidth bound: bytes the step must read (all parameters + the whole KV
  cache) / the measured DRAM bandwidth (a 256 MiB array read and written: `x + 1` in JAX or a
  numpy copy, the faster). A step faster than that "bound" reads part of its bytes from the
  CPU caches (the tiny model's 14 MiB of parameters nearly fit in L3).

* The engine's own figures (`scripts/bench_serve_engine.py`): paged vs dense decode, prefix
  caching's time to first token, chunked prefill's effect on other streams' inter-token p99,
  batched prefill's time to first token of a burst of short prompts, and transformers' batched greedy `generate` on the same model and prompts.

The client runs on the same 2 cores as the server (its share is part of every figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PARTS = ("decode", "cache", "sweep", "paged", "prefix", "chunked", "batched", "transformers")
PROMPT_LEN = (8, 120)
OUTPUT_LEN = (16, 128)


# --- the model --------------------------------------------------------------------------------------
def make_workdir(directory: Path, max_len: int = 512) -> Path:
    env = {**os.environ, "INFRA_CPU_DEVICES": "1"}
    cmd = [sys.executable, "-m", "infra", "train", "--config", "experiments/lm.py:tiny",
           "--workdir", str(directory), "--config.train.steps=1", "--config.checkpoint.every=1",
           "--config.train.eval_every=1000", f"--config.model.max_seq_len={max_len}",
           "--config.sharding.print_table=false", "--config.train.progress_bar=false"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return directory


# --- in-process: bandwidth, decode vs slots, cache vs no cache --------------------------------------
def bandwidth() -> float:
    """Bytes/s moved by `x + 1` over a 256 MiB float32 array in JAX (reads and writes it) or a
    numpy copy of it, whichever is faster, best of 5: far beyond the CPU caches."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.ones(64 * 2**20, jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best_jax = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    a, b = np.ones(64 * 2**20, np.float32), np.empty(64 * 2**20, np.float32)
    np.copyto(b, a)
    best_np = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * x.nbytes / min(best_jax, best_np)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_vs_slots(workdir: Path, slot_counts: list[int], bw: float, steps: int = 200) -> list[dict]:
    import numpy as np

    from infra.serve.engine import Engine, SamplingParams

    rows = []
    for slots in slot_counts:
        engine = Engine.from_workdir(workdir, slots=slots)
        engine.compile(buckets=[16])
        for s in range(slots):
            engine.insert(s, np.arange(1, 9, dtype=np.int32), SamplingParams())
        for _ in range(5):
            engine.step()
        times = []
        for _ in range(steps):
            times.append(_timed(engine.step))
        # the fastest of many steps, like the bandwidth (best of 5): the step's own cost, apart
        # from the other jobs of a shared machine; the median is kept too
        step, median = float(np.min(times)), float(np.median(times))
        nbytes = engine.decode_bytes()
        bound = nbytes / bw
        rows.append({"slots": slots, "step_ms": step * 1e3, "median_step_ms": median * 1e3,
                     "tokens_per_s": slots / step,
                     "bytes_per_step": nbytes, "bound_ms": bound * 1e3,
                     "bound_tokens_per_s": slots / bound, "ratio_to_bound": step / bound})
        print(f"decode  slots={slots:3d}  step {step * 1e3:6.2f} ms (median {median * 1e3:6.2f})  "
              f"{slots / step:8.0f} tok/s  "
              f"bound {bound * 1e3:5.2f} ms ({nbytes / 2**20:.1f} MiB)  x{step / bound:.2f}",
              flush=True)
        del engine
    return rows


def old_sampler(model_def, max_seq_len: int):
    """The no-cache sampler `infra/generate.py` had before the engine (commit fdb4f89): each
    step runs the model over the whole fixed buffer and reads the logits at the position."""
    import jax
    import jax.numpy as jnp

    def sample(params, buffer, start, max_new, temperature, top_k, key, allowed, eos):
        model = model_def.merge(params)
        stop = jnp.minimum(start + max_new, max_seq_len)

        def cond(carry):
            _, pos, done, _ = carry
            return (pos < stop) & ~done

        def body(carry):
            buf, pos, _, key = carry
            logits = model(buf)[0, pos - 1].astype(jnp.float32)
            logits = jnp.where(allowed, logits, -jnp.inf)
            greedy = jnp.argmax(logits)
            k = jnp.clip(top_k, 1, model.vocab_size)
            kth = jnp.sort(logits)[::-1][k - 1]
            filtered = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
            key, sub = jax.random.split(key)
            sampled = jax.random.categorical(sub, filtered / jnp.maximum(temperature, 1e-6))
            token = jnp.where(temperature > 0, sampled, greedy).astype(buf.dtype)
            buf = buf.at[0, pos].set(token)
            return buf, pos + 1, token == eos, key

        buf, end, _, _ = jax.lax.while_loop(cond, body, (buffer, start, jnp.array(False), key))
        return buf, end

    return jax.jit(sample)


def cache_vs_no_cache(workdir: Path, new_tokens: int = 256, prompt_len: int = 16) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from infra.serve.engine import Engine, SamplingParams
    from infra.serve.scheduler import Request, Scheduler

    engine = Engine.from_workdir(workdir, slots=1)
    engine.compile(buckets=[16])
    ids = np.arange(1, prompt_len + 1, dtype=np.int32)

    def run_engine():
        r = Request(ids, SamplingParams(), max_tokens=new_tokens, ignore_eos=True)
        s = Scheduler(engine, engine.tokenizer)
        s.submit(r)
        s.run_until_idle()
        assert len(r.token_ids) == new_tokens
        return r

    run_engine()
    t_engine = min(_timed(run_engine) for _ in range(3))
    length = min(engine.max_len, -(-(prompt_len + new_tokens) // 64) * 64)  # as generate did
    sampler = old_sampler(engine._model_def, length)
    buffer = np.zeros((1, length), np.int32)
    buffer[0, :prompt_len] = ids
    args = (engine.params, jnp.asarray(buffer), jnp.int32(prompt_len), jnp.int32(new_tokens),
            jnp.float32(0), jnp.int32(0), jax.random.key(0), jnp.asarray(engine._allowed),
            jnp.int32(-1))
    jax.block_until_ready(sampler(*args))
    t_old = min(_timed(lambda: jax.block_until_ready(sampler(*args))) for _ in range(2))
    out = {"new_tokens": new_tokens, "prompt_tokens": prompt_len, "engine_s": t_engine,
           "old_generate_s": t_old, "engine_tokens_per_s": new_tokens / t_engine,
           "old_tokens_per_s": new_tokens / t_old, "speedup": t_old / t_engine,
           "old_buffer": length}
    print(f"cache vs no cache: engine {t_engine:.3f} s, old generate {t_old:.3f} s for "
          f"{new_tokens} tokens: x{t_old / t_engine:.1f}", flush=True)
    return out


def engine_figures(workdir: Path, tmp: Path, parts: set[str], old: dict, quick: bool) -> dict:
    """The figures of `scripts/bench_serve_engine.py` asked for in `parts` (the others from
    `old`): paged vs dense and transformers on the 512-context model; prefix caching and
    chunked prefill on the same shape with a 2,048-token context."""
    import bench_serve_engine as figures

    out = {}
    if "paged" in parts:
        out["paged_vs_dense"] = figures.paged_vs_dense(workdir, steps=30 if quick else 100)
    if "batched" in parts:
        out["batched_prefill"] = figures.batched_prefill(workdir)
    if "transformers" in parts:
        out["vs_transformers"] = figures.transformers_baseline(workdir, tmp / "export")
    if parts & {"prefix", "chunked"}:
        long = make_workdir(tmp / "tiny-2k", max_len=2048)
        if "prefix" in parts:
            out["prefix_caching"] = figures.prefix_ttft(long)
        if "chunked" in parts:
            out["chunked_prefill"] = figures.chunked_itl(long, [64, 256] if quick else
                                                         [32, 64, 128, 256, 512, 2048])
    keys = {"paged": "paged_vs_dense", "transformers": "vs_transformers",
            "prefix": "prefix_caching", "chunked": "chunked_prefill",
            "batched": "batched_prefill"}
    return {key: out.get(key, old.get(key)) for key in keys.values()}


# --- the live server ----------------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, workdir: Path, static: bool, slots: int):
        env = {**os.environ, "INFRA_CPU_DEVICES": "1"}
        cmd = [sys.executable, "-m", "infra", "serve", "--workdir", str(workdir), "--port", "0",
               "--slots", str(slots), "--max_queue", "100000", "--model_name", "bench"]
        self.proc = subprocess.Popen(cmd + (["--static"] if static else []), cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if not match:
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.url = f"http://127.0.0.1:{match.group(1)}/v1"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=120)


async def _one(client, prompt: list[int], out_len: int) -> dict:
    start = time.perf_counter()
    chunks, usage = [], None
    try:
        stream = await client.completions.create(
            model="bench", prompt=prompt, max_tokens=out_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunks.append(time.perf_counter())
            if chunk.usage:
                usage = chunk.usage
    except Exception as e:  # noqa: BLE001 - counted, not fatal
        return {"error": repr(e)}
    end = time.perf_counter()
    return {"start": start, "ttft": chunks[0] - start, "itl": [b - a for a, b in zip(chunks, chunks[1:])],
            "e2e": end - start, "end": end, "output_tokens": usage.completion_tokens}


async def _sweep_rate(base_url: str, rate: float, n: int, seed: int) -> list[dict]:
    """`n` requests with exponential gaps of mean 1/rate (open loop: arrivals never wait)."""
    import httpx2
    import openai

    rng = random.Random(seed)
    work = [([rng.randrange(32, 127) for _ in range(rng.randint(*PROMPT_LEN))],
             rng.randint(*OUTPUT_LEN)) for _ in range(n)]
    gaps = [rng.expovariate(rate) for _ in range(n)]
    http = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=None,
                                                   max_keepalive_connections=None), timeout=600)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                                  http_client=http) as client:
        tasks = []
        for (prompt, out_len), gap in zip(work, gaps):
            tasks.append(asyncio.create_task(_one(client, prompt, out_len)))
            await asyncio.sleep(gap)
        return await asyncio.gather(*tasks)


def _pct(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(results: list[dict], rate: float) -> dict:
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    span = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    tokens = sum(r["output_tokens"] for r in ok)
    row = {"rate": rate, "requests": len(results), "errors": len(results) - len(ok),
           "output_tokens": tokens, "duration_s": span, "throughput_tokens_per_s": tokens / span,
           "request_throughput": len(ok) / span}
    for name, xs in (("ttft", [r["ttft"] for r in ok]), ("itl", itl),
                     ("e2e", [r["e2e"] for r in ok])):
        row[f"{name}_p50_ms"] = _pct(xs, 50) * 1e3
        row[f"{name}_p99_ms"] = _pct(xs, 99) * 1e3
    return row


def load_sweep(workdir: Path, rates: list[tuple[float, int]], static: bool,
               slots: int) -> list[dict]:
    """One server; `rates`: (requests/s, how many requests) pairs, one after the other."""
    server = ServerProcess(workdir, static, slots)
    rows = []
    try:
        for i, (rate, n) in enumerate(rates):
            results = asyncio.run(_sweep_rate(server.url, rate, n, seed=i))
            row = summarize(results, rate)
            rows.append(row)
            print(f"{'static' if static else 'continuous':10s} rate {rate:5.1f}/s  "
                  f"{row['throughput_tokens_per_s']:7.0f} tok/s  TTFT p50/p99 "
                  f"{row['ttft_p50_ms']:7.0f}/{row['ttft_p99_ms']:7.0f} ms  ITL p50/p99 "
                  f"{row['itl_p50_ms']:5.1f}/{row['itl_p99_ms']:6.1f} ms  E2E p50/p99 "
                  f"{row['e2e_p50_ms']:6.0f}/{row['e2e_p99_ms']:6.0f} ms", flush=True)
    finally:
        server.stop()
    return rows


def best_rate(rows: list[dict], target_ms: float) -> dict | None:
    good = [r for r in rows if r["ttft_p99_ms"] <= target_ms and not r["errors"]]
    return max(good, key=lambda r: r["rate"]) if good else None


# --- report --------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for mode, style in (("continuous", "o-"), ("static", "s--")):
        rows = result["sweep"][mode]
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["throughput_tokens_per_s"] for r in rows], style, label=mode)
        axes[1].plot(rates, [r["ttft_p99_ms"] / 1e3 for r in rows], style, label=f"{mode} p99")
        axes[1].plot(rates, [r["ttft_p50_ms"] / 1e3 for r in rows], style, alpha=0.4,
                     label=f"{mode} p50")
        axes[2].plot(rates, [r["itl_p99_ms"] for r in rows], style, label=f"{mode} p99")
        axes[2].plot(rates, [r["itl_p50_ms"] for r in rows], style, alpha=0.4, label=f"{mode} p50")
    axes[1].axhline(result["ttft_p99_target_s"], color="gray", lw=0.8, label="p99 target")
    for ax, title, ylabel in ((axes[0], "throughput", "output tokens/s"),
                              (axes[1], "time to first token", "s"),
                              (axes[2], "inter-token latency", "ms")):
        ax.set(title=title, xlabel="request rate (req/s, Poisson)", ylabel=ylabel)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    d = result["decode_vs_slots"]
    axes[3].plot([r["slots"] for r in d], [r["tokens_per_s"] for r in d], "o-", label="measured")
    axes[3].plot([r["slots"] for r in d], [r["bound_tokens_per_s"] for r in d], "k--",
                 label="memory-bandwidth bound")
    axes[3].set(title="decode step, every slot active", xlabel="slots", ylabel="tokens/s",
                xscale="log", yscale="log")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"infra serve on {result['machine']} (lm.py:tiny shape, 512 context, 1 CPU device)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="an LM workdir (default: lm.py:tiny shape, 1 step, made here)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_serve"), help="prefix of .json/.png")
    p.add_argument("--rates", default="1,2,4,8,12,16,24,32", help="request rates (req/s)")
    p.add_argument("--requests_per_rate", type=int, default=0,
                   help="requests per rate (default: 12 s of arrivals, 24..240)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--slot_counts", default="1,2,4,8,16")
    p.add_argument("--ttft_p99_target", type=float, default=1.0, help="seconds")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="what to measure; the others are kept from an existing <out>.json")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if args.quick:
        rates = rates[::2]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(args.workdir) if args.workdir else make_workdir(Path(tmp) / "tiny")
        parts = set(args.parts.split(","))
        old = {}
        if parts != set(PARTS):
            old = json.loads(Path(args.out).with_suffix(".json").read_text())
        engine_parts = engine_figures(workdir, Path(tmp), parts, old, args.quick)
        if "decode" in parts:
            bw = bandwidth()
            print(f"memory bandwidth (256 MiB read + written): {bw / 1e9:.1f} GB/s", flush=True)
            decode = decode_vs_slots(workdir, [int(s) for s in args.slot_counts.split(",")], bw)
        else:
            bw, decode = old["bandwidth_bytes_per_s"], old["decode_vs_slots"]
        cache = cache_vs_no_cache(workdir) if "cache" in parts else old["cache_vs_no_cache"]
        seconds = 6 if args.quick else 12
        plan = [(r, args.requests_per_rate or int(min(240, max(24, r * seconds)))) for r in rates]
        sweep = {("static" if static else "continuous"): load_sweep(workdir, plan, static,
                                                                     args.slots)
                 for static in (False, True)} if "sweep" in parts else old["sweep"]
    target = args.ttft_p99_target * 1e3
    best = {m: best_rate(rows, target) for m, rows in sweep.items()}
    ratio = None
    if best["continuous"] and best["static"]:
        ratio = best["continuous"]["throughput_tokens_per_s"] / best["static"]["throughput_tokens_per_s"]
    by_target = {}
    for t in (0.25, 0.5, 1.0, 2.0):
        b = {m: best_rate(rows, t * 1e3) for m, rows in sweep.items()}
        by_target[str(t)] = {
            "rates": {m: (x["rate"] if x else None) for m, x in b.items()},
            "ratio": (b["continuous"]["throughput_tokens_per_s"] / b["static"]["throughput_tokens_per_s"]
                      if b["continuous"] and b["static"] else None)}
    full = [r for r in decode if r["slots"] == args.slots]
    result = {
        "machine": f"{os.cpu_count()}-core CPU", "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg(), "prompt_len_uniform": PROMPT_LEN,
        "output_len_uniform": OUTPUT_LEN, "slots": args.slots, "ttft_p99_target_s": args.ttft_p99_target,
        "bandwidth_bytes_per_s": bw, "decode_vs_slots": decode, "cache_vs_no_cache": cache,
        "sweep": sweep,
        "best_rate_meeting_target": {m: (b["rate"] if b else None) for m, b in best.items()},
        "continuous_over_static_goodput": ratio,
        "goodput_by_ttft_p99_target_s": by_target,
        "full_slot_step_over_bound": full[0]["ratio_to_bound"] if full else None,
        **engine_parts,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("best_rate_meeting_target",
                                             "continuous_over_static_goodput",
                                             "goodput_by_ttft_p99_target_s",
                                             "full_slot_step_over_bound")}))
    print(f"cache vs no cache: x{cache['speedup']:.1f}; wrote {out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
