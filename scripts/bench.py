#!/usr/bin/env python
"""Benchmark of the training stack on CPU: step overhead, throughput, MFU, checkpoints, data.

    python scripts/bench.py [--quick] [--out bench.json] [--cpu_devices N]

The model is a 14.3M-parameter GPT (6 layers, d_model 384, 6 heads of 64, SwiGLU mlp 1536,
seq 256, batch 8, vocab 384, float32) on 1 CPU device; `--quick` shrinks it so the whole script
takes well under a minute (what `tests/test_bench.py` runs). Sections:

  (a) our compiled `Trainer.train_step` vs a hand-written `jax.jit` step of the same model,
      loss, optimizer, shardings and donation: overhead ratio of step times (target <= 1.02);
  (b) our tokens/s vs the Flax NNX docs' loop (`nnx.Optimizer` + `@nnx.jit`) and vs the same
      GPT in PyTorch eager (only when `torch` is importable);
  (c) MFU: XLA cost-analysis FLOPs of our compiled step / step time / CPU matmul peak (>= 0.5),
      the peak being a float32 matmul timed in the same rotation as the steps;
  (d) checkpoints: synchronous save throughput vs the disk's sequential write speed, and the
      time `save()` blocks the loop with async on vs off (blocking fraction, target <= 0.05);
  (e) data: batches/s of the grain iterator (+ `to_global`) vs batches/s the step consumes, and
      the input-wait fraction of a loop run the way `infra.train` runs it (target <= 0.01).

Step timings are medians over N steps after warm-up, each step ended with `block_until_ready`;
the three JAX steps, the PyTorch step and the matmul peak (the best of a few 2048 x 2048
matmuls) are interleaved step by step, in an order that rotates every step, so that load from
other processes and cache effects hit them alike: MFU divides the median step's FLOP/s by the
median peak, both measured under the same load. The best peak seen is also folded into the
cached peak the training loop uses (`infra.utilization`). Prints a table and writes every
number, plus machine info, to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(num_layers=6, d_model=384, num_heads=6, num_kv_heads=6, head_dim=64, mlp_dim=1536,
            seq_len=256, batch_size=8, warmup=2, steps=10, disk_mb=256, saves=3, data_batches=50)
QUICK = dict(num_layers=2, d_model=128, num_heads=2, num_kv_heads=2, head_dim=64, mlp_dim=512,
             seq_len=64, batch_size=8, warmup=1, steps=3, disk_mb=32, saves=2, data_batches=20)

PEAK_MATMULS = 5  # matmuls per peak slot of the rotation; the slot's figure is the fastest
TARGETS = {"overhead": 1.02, "torch": 1.0, "mfu": 0.5, "blocking": 0.05, "input_wait": 0.01}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (CI; < 60 s)")
    p.add_argument("--out", default="bench.json", help="where to write the JSON results")
    p.add_argument("--cpu_devices", type=int, default=1, help="emulated CPU devices (default 1)")
    p.add_argument("--tmpdir", default=None, help="directory for checkpoints and the disk test "
                   "(default: the system temp dir)")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch comparison")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def median(xs):
    return float(statistics.median(xs))


def timed(fn):
    """Seconds fn() took, its result blocked on."""
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def make_config(sizes: dict):
    from infra import config as config_lib

    overrides = {
        "model.vocab_size": 384,
        "model.num_layers": sizes["num_layers"],
        "model.d_model": sizes["d_model"],
        "model.num_heads": sizes["num_heads"],
        "model.num_kv_heads": sizes["num_kv_heads"],
        "model.head_dim": sizes["head_dim"],
        "model.mlp_dim": sizes["mlp_dim"],
        "model.max_seq_len": sizes["seq_len"],
        "model.dtype": "float32",
        "model.param_dtype": "float32",
        "data.seq_len": sizes["seq_len"],
        "train.batch_size": sizes["batch_size"],
        "train.steps": 1000,
        "train.progress_bar": False,
        "mesh.data": -1,
        "sharding.print_table": False,
    }
    return config_lib.load("experiments/lm.py:tiny", overrides=overrides)


def nbytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- (a), (b), (c)


def bench_steps(cfg, sizes, trainer, batches, torch_step_fn=None):
    """Interleaved timing of our step, the plain jax.jit step, the NNX-docs loop and (when
    given) the PyTorch eager step, so that load from other processes hits them alike."""
    import jax
    import optax
    from flax import nnx

    from infra import utilization
    from infra.optim import make_optimizer
    from infra.state import replicated

    tokens_per_step = sizes["batch_size"] * sizes["seq_len"]

    # Ours: the jitted step of infra.train.build, compiled ahead of time as the loop does.
    state = trainer.state.init(jax.random.key(0))
    t0 = time.perf_counter()
    ours = trainer.train_step.lower(state, batches[0]).compile()
    ours_compile = time.perf_counter() - t0
    flops = utilization.compiled_flops(ours)

    # Plain: the same model, loss and optimizer, written directly with jax.jit.
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    merge = trainer.state.model.merge
    shardings = trainer.state.shardings

    def plain_step(params, opt_state, batch):
        def loss_fn(p):
            logits = merge(p)(batch["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    plain_jit = jax.jit(
        plain_step,
        in_shardings=(shardings["params"], shardings["opt_state"], trainer.batch_shardings),
        out_shardings=(shardings["params"], shardings["opt_state"], replicated(trainer.mesh)),
        donate_argnums=(0, 1),
    )
    init2 = trainer.state.init(jax.random.key(0))
    params, opt_state = init2["params"], init2["opt_state"]
    t0 = time.perf_counter()
    plain = plain_jit.lower(params, opt_state, batches[0]).compile()
    plain_compile = time.perf_counter() - t0
    plain_flops = utilization.compiled_flops(plain)

    # NNX docs: nnx.Optimizer + @nnx.jit on the module (no donation, as in the docs).
    # The module starts from the same initial parameters as ours and plain (a fresh copy).
    model = merge(trainer.state.init(jax.random.key(0))["params"])
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    t0 = time.perf_counter()
    jax.block_until_ready(nnx_step(model, optimizer, batches[0]))  # compile + first step
    nnx_first = time.perf_counter() - t0

    carry = {"state": state, "params": params, "opt_state": opt_state}

    # Each returns (everything the step produced, to block on; its loss).
    def run_ours(b, i):
        carry["state"], metrics = ours(carry["state"], b)
        return (carry["state"], metrics), metrics["loss"]

    def run_plain(b, i):
        carry["params"], carry["opt_state"], loss = plain(carry["params"], carry["opt_state"], b)
        return (carry["params"], carry["opt_state"], loss), loss

    def run_nnx(b, i):  # one executable: its outputs are ready together with the loss
        loss = nnx_step(model, optimizer, b)
        return loss, loss

    contestants = {"ours": run_ours, "plain": run_plain, "nnx": run_nnx}
    if torch_step_fn:
        contestants["torch"] = lambda b, i: (None, torch_step_fn(i))
    peak_run, peak_flops = utilization.matmul_probe()
    contestants["peak"] = lambda b, i: (None, min(peak_run() for _ in range(PEAK_MATMULS)))
    names = list(contestants)
    times = {k: [] for k in names}
    losses, peak_samples = {}, []
    for i in range(sizes["warmup"] + sizes["steps"]):
        b = batches[i % len(batches)]
        # Rotate the order every step: each one follows each other equally often (a step run
        # right after another program's pays for the caches that program evicted).
        for name in names[i % len(names):] + names[: i % len(names)]:
            dt, (_, out) = timed(lambda: contestants[name](b, i))
            if name == "peak":
                if i >= sizes["warmup"]:
                    peak_samples.append(peak_flops / out)  # machine-wide FLOP/s
                continue
            if i >= sizes["warmup"]:
                times[name].append(dt)
            if name != "torch":
                losses[name] = float(out)
    state = carry["state"]

    step_s = {k: median(v) for k, v in times.items() if v}
    tps = {k: tokens_per_step / v for k, v in step_s.items()}
    peak = median(peak_samples) / jax.local_device_count()
    # The best interleaved timing is a measurement like any other: it may raise the cached peak.
    utilization.remember_cpu_matmul_peak(max(peak_samples))
    cached_peak, cached_source = utilization.peak_flops_per_device()
    result = {
        "a_overhead": {
            "ours_step_s": step_s["ours"], "plain_step_s": step_s["plain"],
            "ours_tokens_per_s": tps["ours"], "plain_tokens_per_s": tps["plain"],
            "overhead_ratio": step_s["ours"] / step_s["plain"],
            "target_max": TARGETS["overhead"],
            "ours_compile_s": ours_compile, "plain_compile_s": plain_compile,
            "ours_step_times_s": times["ours"], "plain_step_times_s": times["plain"],
            "last_loss": {"ours": losses["ours"], "plain": losses["plain"]},
            "plain_flops_per_step": plain_flops,
            "note": "plain = jax.jit(value_and_grad(cross-entropy of the merged NNX model) + the "
                    "same optax chain (clip_by_global_norm + adamw, infra.optim)), same shardings, "
                    "donate params and opt_state; ours additionally computes accuracy, grad_norm, "
                    "lr and the non-finite guard (jnp.where over params and opt_state)",
        },
        "b_throughput": {
            "ours_tokens_per_s": tps["ours"],
            "nnx_tokens_per_s": tps["nnx"], "nnx_step_s": step_s["nnx"],
            "ours_over_nnx": tps["ours"] / tps["nnx"],
            "nnx_first_step_s": nnx_first, "nnx_step_times_s": times["nnx"],
            "nnx_last_loss": losses["nnx"],
            "note": "nnx = nnx.Optimizer(model, tx, wrt=nnx.Param) + @nnx.jit train_step with "
                    "nnx.value_and_grad and optimizer.update(model, grads), same tx",
        },
        "torch_step": {"step_s": step_s["torch"], "tokens_per_s": tps["torch"],
                       "step_times_s": times["torch"]} if "torch" in step_s else {},
        "c_mfu": {
            "flops_per_step_per_device": flops,
            "step_s": step_s["ours"],
            "achieved_flops_per_s": flops / step_s["ours"] if flops else None,
            "peak_flops_per_s_per_device": peak,
            "peak_source": f"median over the timed rotations of the best of {PEAK_MATMULS} float32 "
                           f"{utilization.MATMUL_SIZE}x{utilization.MATMUL_SIZE} matmuls, timed "
                           "interleaved with the steps; machine-wide figure / local devices",
            "peak_samples_flops_per_s": peak_samples,
            "mfu": flops / step_s["ours"] / peak if flops else None,
            "plain_mfu": plain_flops / step_s["plain"] / peak if plain_flops else None,
            "cached_peak_flops_per_s_per_device": cached_peak, "cached_peak_source": cached_source,
            "mfu_vs_cached_peak": flops / step_s["ours"] / cached_peak if flops and cached_peak else None,
            "target_min": TARGETS["mfu"],
        },
    }
    return result, state


def torch_gpt(sizes):
    """The same GPT (RMSNorm, RoPE, MHA/GQA, SwiGLU, tied embeddings) in PyTorch eager."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, h, kv, hd, m = (sizes[k] for k in ("d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"))

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale

    def rope(x, cos, sin):  # x: (b, heads, t, hd)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = RMSNorm(), RMSNorm()
            self.q = nn.Linear(d, h * hd, bias=False)
            self.k = nn.Linear(d, kv * hd, bias=False)
            self.v = nn.Linear(d, kv * hd, bias=False)
            self.o = nn.Linear(h * hd, d, bias=False)
            self.gate = nn.Linear(d, m, bias=False)
            self.up = nn.Linear(d, m, bias=False)
            self.down = nn.Linear(m, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            y = self.n1(x)
            q = self.q(y).view(b, t, h, hd).transpose(1, 2)
            k = self.k(y).view(b, t, kv, hd).transpose(1, 2)
            v = self.v(y).view(b, t, kv, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, h * hd))
            y = self.n2(x)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(384, d)
            self.blocks = nn.ModuleList(Block() for _ in range(sizes["num_layers"]))
            self.norm = RMSNorm()
            half = hd // 2
            inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
            ang = torch.arange(sizes["seq_len"], dtype=torch.float32)[:, None] * inv[None]
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, tokens):
            x = self.emb(tokens)
            for blk in self.blocks:
                x = blk(x, self.cos, self.sin)
            return self.norm(x) @ self.emb.weight.T

    return GPT()


def torch_step(sizes, batches_np):
    """(step(i) -> None, info): one PyTorch eager step of the same GPT and optimizer on batch i,
    already warmed up; step is None (and info says why) when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None, {"skipped": "torch is not importable in this environment"}
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_gpt(sizes)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    data = [(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
            for b in batches_np]

    def step(i):
        x, y = data[i % len(data)]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    step(0)  # eager: the first step allocates optimizer state and caches
    return step, {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                  "note": "eager, F.scaled_dot_product_attention(is_causal=True), AdamW + "
                          "clip_grad_norm_; timed interleaved with the JAX steps"}


# ----------------------------------------------------------------------------- (d)


def disk_write_speed(directory: Path, mb: int) -> float:
    """Sequential write MB/s: `mb` MB with os.write in 8 MB chunks, then fsync."""
    chunk = os.urandom(8 * 2**20)
    path = directory / "disk_speed.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(max(1, mb // 8)):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return size / 1e6 / dt


def bench_checkpoints(sizes, trainer, state, tmp: Path):
    import jax

    from infra.checkpoint import Checkpointer

    task = trainer.task
    it = task.train_iterator(0, 1)
    state_bytes = nbytes(state)
    disk = disk_write_speed(tmp, sizes["disk_mb"])

    def run(async_save: bool):
        ckpt = Checkpointer(tmp / ("async" if async_save else "sync"), every=1, keep=2,
                            async_save=async_save)
        blocked, total = [], []
        try:
            for i in range(1 + sizes["saves"]):  # the first save (Orbax set-up) is warm-up
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                ckpt.save(i + 1, state, it, {})
                t1 = time.perf_counter()
                ckpt.wait()
                t2 = time.perf_counter()
                if i:
                    blocked.append(t1 - t0)
                    total.append(t2 - t0)
        finally:
            ckpt.close()
        return blocked, total

    sync_blocked, sync_total = run(False)
    async_blocked, async_total = run(True)
    sync_s = median(sync_total)
    return {
        "state_bytes": state_bytes,
        "sync_save_s": sync_s,
        "save_mb_per_s": state_bytes / 1e6 / sync_s,
        "disk_write_mb_per_s": disk, "disk_test_mb": sizes["disk_mb"],
        "save_over_disk": state_bytes / 1e6 / sync_s / disk,
        "sync_blocking_s": median(sync_blocked),
        "async_blocking_s": median(async_blocked),
        "async_total_s": median(async_total),
        "blocking_fraction": median(async_blocked) / median(sync_blocked),
        "target_max": TARGETS["blocking"],
        "sync_save_times_s": sync_total, "async_blocking_times_s": async_blocked,
        "directory": str(tmp),
        "note": "save(step, state, iterator, meta) until it returns = blocking time; sync = "
                "Checkpointer(async_save=False) save + wait; state = params + AdamW moments",
    }


# ----------------------------------------------------------------------------- (e)


def bench_data(sizes, trainer, ours_step_s: float, compiled_state):
    import jax

    from infra import sharding

    task = trainer.task
    to_global = lambda b: sharding.to_global(b, trainer.batch_shardings)  # noqa: E731
    it = task.train_iterator(0, 1)
    for _ in range(3):
        jax.block_until_ready(to_global(next(it)))
    times = []
    for _ in range(sizes["data_batches"]):
        t0 = time.perf_counter()
        jax.block_until_ready(to_global(next(it)))
        times.append(time.perf_counter() - t0)
    per_batch = sum(times) / len(times)
    supply = 1 / per_batch
    demand = 1 / ours_step_s

    # A loop run the way infra.train._train runs it: fetch, dispatch, sync only at the end.
    step, state = compiled_state
    waited = 0.0
    n = sizes["steps"]
    jax.block_until_ready(state)
    t_start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        batch = to_global(next(it))
        waited += time.perf_counter() - t0
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    interval = time.perf_counter() - t_start
    return {
        "iterator_batches_per_s": supply, "iterator_s_per_batch": per_batch,
        "step_batches_per_s": demand,
        "supply_over_demand": supply / demand,
        "input_wait_fraction_estimate": per_batch / (per_batch + ours_step_s),
        "input_wait_fraction": waited / interval,
        "loop_steps": n, "loop_s": interval, "loop_waited_s": waited,
        "target_max": TARGETS["input_wait"],
        "note": "iterator = next() + infra.sharding.to_global, blocked on; input_wait_fraction is "
                "measured in a loop shaped like infra.train's (waited / interval); the estimate "
                "assumes no overlap of data and compute",
    }, state


# ----------------------------------------------------------------------------- report


def fmt(x, kind=""):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if kind == "frac":
        return f"{x:.3f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def table_rows(r):
    a, b, c, d, e = (r[k] for k in ("a_overhead", "b_throughput", "c_mfu", "d_checkpoint", "e_data"))
    t = r.get("b_torch", {})
    rows = [
        ("(a) step overhead: ours vs plain jax.jit (step s)", a["ours_step_s"], a["plain_step_s"],
         a["overhead_ratio"], "≤ 1.02", a["overhead_ratio"] <= TARGETS["overhead"]),
        ("(a) tokens/s: ours vs plain jax.jit", a["ours_tokens_per_s"], a["plain_tokens_per_s"],
         a["ours_tokens_per_s"] / a["plain_tokens_per_s"], "—", None),
        ("(b) tokens/s: ours vs NNX docs loop", b["ours_tokens_per_s"], b["nnx_tokens_per_s"],
         b["ours_over_nnx"], "—", None),
    ]
    if "tokens_per_s" in t:
        ratio = b["ours_tokens_per_s"] / t["tokens_per_s"]
        rows.append(("(b) tokens/s: ours vs PyTorch eager", b["ours_tokens_per_s"], t["tokens_per_s"],
                     ratio, "≥ 1", ratio >= TARGETS["torch"]))
    else:
        rows.append(("(b) tokens/s: ours vs PyTorch eager", b["ours_tokens_per_s"], "skipped",
                     None, "≥ 1", None))
    mfu = c["mfu"]
    rows += [
        ("(c) MFU: achieved vs interleaved matmul peak GFLOP/s",
         c["achieved_flops_per_s"] / 1e9 if c["achieved_flops_per_s"] else None,
         c["peak_flops_per_s_per_device"] / 1e9, mfu, "≥ 0.5",
         None if mfu is None else mfu >= TARGETS["mfu"]),
        ("(c) matmul peak GFLOP/s: interleaved vs cached best", c["peak_flops_per_s_per_device"] / 1e9,
         c["cached_peak_flops_per_s_per_device"] / 1e9,
         c["peak_flops_per_s_per_device"] / c["cached_peak_flops_per_s_per_device"], "—", None),
        ("(d) checkpoint save vs disk write (MB/s)", d["save_mb_per_s"], d["disk_write_mb_per_s"],
         d["save_over_disk"], "—", None),
        ("(d) save() blocking: async vs sync (s)", d["async_blocking_s"], d["sync_blocking_s"],
         d["blocking_fraction"], "≤ 0.05", d["blocking_fraction"] <= TARGETS["blocking"]),
        ("(e) batches/s: iterator vs step", e["iterator_batches_per_s"], e["step_batches_per_s"],
         e["supply_over_demand"], "—", None),
        ("(e) input-wait fraction (loop; est.)", e["input_wait_fraction"],
         e["input_wait_fraction_estimate"], None, "≤ 0.01",
         e["input_wait_fraction"] <= TARGETS["input_wait"]),
    ]
    return rows


def render(rows) -> str:
    head = ("metric", "ours", "reference", "ratio", "target", "met?")
    body = [(m, fmt(o), fmt(ref), fmt(ra, "frac") if ra is not None else "—", tg,
             "—" if met is None else ("yes" if met else "NO")) for m, o, ref, ra, tg, met in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv=None) -> int:
    args = parse_args(argv)
    from infra import mesh as mesh_lib
    from infra import process

    process.setup()  # as the CLI does: malloc settings before JAX starts its threads

    mesh_lib.emulate_cpu_devices(args.cpu_devices)
    import flax
    import jax
    import numpy as np

    from infra import sharding
    from infra.train import build

    t_begin = time.perf_counter()
    load_start = os.getloadavg()
    sizes = QUICK if args.quick else FULL
    cfg = make_config(sizes)
    trainer = build(cfg)
    n_params = nbytes(trainer.state.abstract["params"]) // 4
    print(f"model: {n_params / 1e6:.2f}M params, batch {sizes['batch_size']} x seq {sizes['seq_len']}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s); load average {load_start[0]:.2f}",
          flush=True)

    it = trainer.task.train_iterator(0, 1)
    batches_np = [next(it) for _ in range(8)]
    batches = [sharding.to_global(b, trainer.batch_shardings) for b in batches_np]

    results = {}
    step_fn, results["b_torch"] = (None, {"skipped": "--no_torch"}) if args.no_torch else \
        torch_step(sizes, batches_np)
    print("(a)-(c) interleaved step timing" + (" (+ PyTorch eager)" if step_fn else "") + " ...",
          flush=True)
    steps, state = bench_steps(cfg, sizes, trainer, batches, step_fn)
    results["b_torch"].update(steps.pop("torch_step"))
    results.update(steps)
    print("(d) checkpoints ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="infra-bench-", dir=args.tmpdir))
    try:
        results["d_checkpoint"] = bench_checkpoints(sizes, trainer, state, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("(e) data ...", flush=True)
    compiled = trainer.train_step.lower(state, batches[0]).compile()
    results["e_data"], state = bench_data(sizes, trainer, results["a_overhead"]["ours_step_s"],
                                          (compiled, state))

    rows = table_rows(results)
    table = render(rows)
    print()
    print(table)
    if "skipped" in results["b_torch"]:
        print(f"\nPyTorch comparison skipped: {results['b_torch']['skipped']}")

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "model": {**{k: sizes[k] for k in ("num_layers", "d_model", "num_heads", "num_kv_heads",
                                           "head_dim", "mlp_dim", "seq_len", "batch_size")},
                  "vocab_size": 384, "dtype": "float32", "params": n_params},
        "timing": {"warmup_steps": sizes["warmup"], "timed_steps": sizes["steps"],
                   "statistic": "median"},
        "machine": {
            "processor": platform.processor(), "machine": platform.machine(),
            "node": platform.node(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "numpy": np.__version__,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
        },
        **results,
        "table": [dict(zip(("metric", "ours", "reference", "ratio", "target", "met"), r)) for r in rows],
        "wall_s": time.perf_counter() - t_begin,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.out} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
