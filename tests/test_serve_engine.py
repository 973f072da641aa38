"""The serving engine (`infra/serve`): KV-cache logits equal the full forward pass, requests are
independent of what else runs, nothing compiles after warm-up, the cache shards over 8 devices.

Models here are random (no training): every option of the Llama family is on (q/k/v and output
biases, MLP biases, q/k norm, llama3 RoPE scaling, GQA, untied output) and every weight is
perturbed so that biases and norms matter.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infra import config as config_lib
from infra import sharding
from infra.mesh import serve_mesh
from infra.serve import forward
from infra.serve.engine import Engine, SamplingParams, buckets
from infra.serve.scheduler import Request, Scheduler, Token
from infra.state import shard_state
from infra.tasks import get_task, logical_rules

VOCAB = 384
FEATURES = {"qkv_bias": True, "out_bias": True, "mlp_bias": True, "qk_norm": True,
            "rope_scaling": "llama3", "rope_original_max_len": 16, "tie_embeddings": False}


def make_config(extra: dict | None = None, **model):
    overrides = {"model.vocab_size": VOCAB, "model.max_seq_len": 64, "model.d_model": 32,
                 "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 8,
                 "model.mlp_dim": 64, "model.num_layers": 2, "model.rope_theta": 500000.0}
    overrides |= {f"model.{k}": v for k, v in model.items()} | (extra or {})
    return config_lib.load("experiments/lm.py:smoke", overrides)


def random_engine(config, *, devices=None, slots=4, seed=0, **engine) -> Engine:
    mesh = serve_mesh(config, devices)
    rules = sharding.normalize_rules(logical_rules(config), mesh)
    sharded = shard_state(get_task(config).build_model, optax.identity(), mesh, rules)
    params = sharded.init(jax.random.key(seed))["params"]
    shardings = jax.tree.map(lambda x: x.sharding, params)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # perturb every weight (biases start at 0, norms at 1): N(w, 0.3 * std-ish)
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) * (1.0 if x.ndim < 2 else
              float(x.shape[0]) ** -0.5) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
    params["embedding"] = jax.random.normal(keys[0], params["embedding"].shape)  # logits ~ O(1)
    params = jax.device_put(params, shardings)
    allowed = np.ones(VOCAB, bool)
    return Engine(sharded.model, params, config, mesh=mesh, rules=rules, slots=slots,
                  allowed=allowed, **engine)


class Tok:
    """A tokenizer stand-in for the scheduler: ids are characters."""

    vocab_size, bos_id, eos_id, pad_id = VOCAB, None, -1, None

    def decode(self, ids):
        return "".join(chr(48 + int(i) % 64) for i in ids)


def test_buckets():
    assert buckets(512) == [16, 32, 64, 128, 256, 512]
    assert buckets(64) == [16, 32, 64]
    assert buckets(100) == [16, 32, 64, 100]
    assert buckets(8) == [8]


LORA = {"finetune.lora.rank": 4, "finetune.lora.targets": "attn/(q|k|v|o)|mlp/(gate|up|down)"}


# layer 0 dense, layer 1 with 4 experts (top 2) and a shared expert
MOE = {"num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 32, "moe_every": 2,
       "shared_experts": 1}


@pytest.mark.parametrize("features, extra", [(FEATURES, None), ({}, None), (FEATURES, LORA),
                                             ({**FEATURES, **MOE}, LORA)],
                         ids=["llama-family-options", "plain-tied", "lora-adapters", "moe-lora"])
def test_cached_logits_equal_the_full_forward(features, extra):
    """Prefill one prompt into a slot, then decode; another slot decodes its own sequence at the
    same time. Each sequence's pages are scattered over the cache in no order, one prompt is
    prefilled in two chunks. Every logit row equals the training forward pass over the same
    tokens (LoRA: the adapters, perturbed from their zero init, on every projection)."""
    config = make_config(extra, **features)
    engine = random_engine(config, devices=jax.devices()[:1])
    model_def, params = engine._model_def, engine.params
    rng = np.random.default_rng(0)
    seqs = {1: rng.integers(0, VOCAB, 40), 3: rng.integers(0, VOCAB, 30)}
    prompt = {1: 11, 3: 20}  # prompt lengths; the rest is fed one token per decode step
    chunks = {1: [(0, 7), (7, 4)], 3: [(0, 20)]}  # (start, length)
    table = np.zeros((engine.slots, engine.pages_per_seq), np.int32)
    table[1], table[3] = [9, 2, 14, 5], [1, 16, 7, 3]
    assert engine.page_size == 16 and engine.pages_per_seq == 4

    with sharding.activation_rules(engine.mesh, engine.rules):
        full = jax.jit(lambda p, t: model_def.merge(p)(t))
        pre = jax.jit(lambda p, c, t, start, n, row: forward.prefill(
            model_def.merge(p), c, t, start, n, row)[:2])
        dec = jax.jit(lambda p, c, t, pos, active, tab: forward.decode(
            model_def.merge(p), c, t, pos, active, tab))
        cache = engine.cache
        worst = 0.0
        for slot, seq in seqs.items():
            ref = np.asarray(full(params, jnp.asarray(seq[None])))[0]
            for start, n in chunks[slot]:
                tokens = np.zeros((1, 32), np.int32)
                tokens[0, :n] = seq[start:start + n]
                cache, last = pre(params, cache, tokens, np.asarray([start], np.int32),
                                  np.asarray([n], np.int32), table[slot][None])
                worst = max(worst, float(np.abs(np.asarray(last)[0] - ref[start + n - 1]).max()))
        refs = {s: np.asarray(full(params, jnp.asarray(seq[None])))[0] for s, seq in seqs.items()}
        active = np.zeros(engine.slots, bool)
        active[list(seqs)] = True
        for step in range(9):
            pos = np.full(engine.slots, 5, np.int32)  # inactive slots: their writes go to trash
            tok = np.zeros(engine.slots, np.int32)
            for slot, seq in seqs.items():
                pos[slot] = prompt[slot] + step
                tok[slot] = seq[pos[slot]]
            cache, logits = dec(params, cache, tok, pos, active, table)
            logits = np.asarray(logits)
            for slot in seqs:
                worst = max(worst, float(np.abs(logits[slot] - refs[slot][pos[slot]]).max()))
    scale = max(float(np.abs(r).max()) for r in refs.values())
    print(f"\nmax |cached - full| = {worst:.2e} (logits up to {scale:.1f})")
    assert scale > 1.0 and worst < 1e-5


def _greedy_alone(engine, ids, max_tokens):
    r = Request(np.asarray(ids, np.int32), SamplingParams(), max_tokens=max_tokens)
    s = Scheduler(engine, Tok())
    s.submit(r)
    s.run_until_idle()
    return r.token_ids


def _in_busy_batch(engine, target: Request, rng: random.Random, n_others=10):
    """Run `target` among `n_others` requests of mixed lengths, each submitted at a random
    decode step; `target` arrives at a random step too."""
    s = Scheduler(engine, Tok())
    others = [Request(np.asarray([rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))],
                                 np.int32),
                      SamplingParams(temperature=rng.choice([0.0, 1.0]), top_k=rng.choice([0, 5]),
                                     top_p=rng.choice([1.0, 0.8]), seed=rng.randrange(100)),
                      max_tokens=rng.randint(1, 20)) for _ in range(n_others)]
    arrivals = sorted(rng.randrange(30) for _ in others)
    at = rng.randrange(1, 20)
    pending = list(zip(arrivals, others)) + [(at, target)]
    pending.sort(key=lambda p: p[0])
    step = 0
    while pending or not s.idle():
        while pending and pending[0][0] <= step:
            s.submit(pending.pop(0)[1])
        s.step()
        step += 1
    return target


def test_a_request_gives_the_same_tokens_alone_and_in_a_busy_batch():
    config = make_config(**FEATURES)
    engine = random_engine(config, slots=4)
    rng = random.Random(0)
    ids = [rng.randrange(VOCAB) for _ in range(13)]
    alone = _greedy_alone(engine, ids, 24)
    assert len(alone) == 24
    for trial in range(3):
        target = Request(np.asarray(ids, np.int32), SamplingParams(), max_tokens=24)
        assert _in_busy_batch(engine, target, rng).token_ids == alone, trial
    # a seeded sampled request: the same tokens in any slot, whatever runs beside it
    sampled = dict(temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    reference = None
    for trial in range(4):
        target = Request(np.asarray(ids, np.int32), SamplingParams(**sampled), max_tokens=24)
        got = _in_busy_batch(engine, target, rng).token_ids
        reference = reference or got
        assert got == reference, trial
    assert reference != alone  # it did sample


def test_each_token_comes_with_its_log_probability_under_the_model():
    """`Request.logprobs` (what RL learners and OpenAI `logprobs` read): for greedy and sampled
    requests decoded in a busy batch, each equals the float32 log-softmax of the full forward
    pass over prompt + completion at that token (the model's distribution, before temperature
    and truncation)."""
    config = make_config(**FEATURES)
    engine = random_engine(config, slots=4)
    full = jax.jit(lambda p, t: jax.nn.log_softmax(engine._model_def.merge(p)(t), axis=-1))
    rng = random.Random(3)
    ids = [rng.randrange(VOCAB) for _ in range(9)]
    for sampling in (SamplingParams(), SamplingParams(temperature=1.5, top_k=10, seed=7)):
        target = _in_busy_batch(engine, Request(np.asarray(ids, np.int32), sampling,
                                                max_tokens=12), rng)
        assert len(target.logprobs) == len(target.token_ids) == 12
        seq = np.asarray(ids + target.token_ids, np.int32)
        with sharding.activation_rules(engine.mesh, engine.rules):
            ref = np.asarray(full(engine.params, jnp.asarray(seq[None])))[0]
        expected = [ref[len(ids) - 1 + i, t] for i, t in enumerate(target.token_ids)]
        np.testing.assert_allclose(target.logprobs, expected, atol=1e-4)
        assert max(expected) < 0  # real distributions, not all probability on one id


def test_prompt_scores_and_top_logprobs_equal_the_full_forward(monkeypatch):
    """`score_prompt` (OpenAI's `echo` + `logprobs`) gives each prompt token's log-probability
    and `top_logprobs` each position's likeliest ids, both equal to the full forward pass
    (float32, 1e-4) over prompt + completion; alternatives are sorted, the greedy token is the
    first of them. The prompt is prefilled in 3 chunks of several scoring blocks each, and the
    request runs in a busy batch."""
    monkeypatch.setattr(forward, "SCORE_BLOCK", 8)  # 16-token chunks: blocks of each chunk
    config = make_config(**FEATURES)
    engine = random_engine(config, slots=4, prefill_chunk=16)  # the prompt in 3 chunks
    allowed = np.ones(VOCAB, bool)
    allowed[7] = False  # never drawn: never listed among the alternatives either
    engine._allowed = allowed
    full = jax.jit(lambda p, t: jax.nn.log_softmax(engine._model_def.merge(p)(t), axis=-1))
    rng = random.Random(5)
    ids = [rng.randrange(VOCAB) for _ in range(40)]
    target = _in_busy_batch(engine, Request(np.asarray(ids, np.int32), SamplingParams(),
                                            max_tokens=6, top_logprobs=5, score_prompt=True), rng)
    seq = np.asarray(ids + target.token_ids, np.int32)
    with sharding.activation_rules(engine.mesh, engine.rules):
        ref = np.asarray(full(engine.params, jnp.asarray(seq[None])))[0]
    masked = np.where(allowed[None], ref, -np.inf)

    chosen, top_ids, top_values = target.prompt_scores
    assert chosen.shape == (39,) and top_ids.shape == (39, 20)
    np.testing.assert_allclose(chosen, [ref[i, ids[i + 1]] for i in range(39)], atol=1e-4)
    np.testing.assert_allclose(top_values, -np.sort(-masked[:39], axis=-1)[:, :20], atol=1e-4)
    np.testing.assert_allclose(top_values, np.take_along_axis(ref[:39], top_ids, -1), atol=1e-4)
    assert 7 not in top_ids

    assert len(target.top) == len(target.token_ids) == 6
    for i, (token, (alt_ids, alt_values)) in enumerate(zip(target.token_ids, target.top)):
        row = ref[len(ids) - 1 + i]
        assert len(alt_ids) == 5 and alt_ids[0] == token  # greedy: the likeliest
        assert np.all(np.diff(alt_values) <= 0)
        np.testing.assert_allclose(alt_values, row[alt_ids], atol=1e-4)
        np.testing.assert_allclose(alt_values, -np.sort(-masked[len(ids) - 1 + i])[:5], atol=1e-4)
        assert target.logprobs[i] == pytest.approx(float(alt_values[0]), abs=1e-6)


def test_short_prompts_prefilled_in_one_call_equal_one_at_a_time():
    """Four short prompts arriving together go through one prefill call (greedy and seeded,
    one scored with its alternatives; rows of different adapters: the adapter test): tokens,
    log-probabilities, prompt scores and alternatives equal an engine that prefills one
    prompt per call."""
    config = make_config(**FEATURES)
    rng = random.Random(11)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 16, 9, 12)]
    samplings = [SamplingParams(), SamplingParams(temperature=1.0, top_k=8, seed=5),
                 SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, seed=9)]
    results = {}
    for rows in (4, 1):
        engine = random_engine(config, slots=4, prefill_chunk=64, prefill_rows=rows)
        calls = []
        original = engine.prefill
        engine.prefill = lambda slots: calls.append(list(slots)) or original(slots)
        s = Scheduler(engine, Tok())
        requests = s.submit_all([
            Request(np.asarray(p, np.int32), sp, max_tokens=10, top_logprobs=3 * (i == 2),
                    score_prompt=i == 2) for i, (p, sp) in enumerate(zip(prompts, samplings))])
        s.run_until_idle()
        results[rows] = requests
        assert len(calls) == (1 if rows == 4 else 4) and len(calls[0]) == rows
        assert engine.prefill_shapes[-1] == ((4, 16) if rows == 4 else (1, 64))
    for batched, single in zip(results[4], results[1]):
        assert batched.token_ids == single.token_ids and len(batched.token_ids) == 10
        np.testing.assert_allclose(batched.logprobs, single.logprobs, atol=1e-5)
    for got, want in zip(results[4][2].prompt_scores, results[1][2].prompt_scores):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert results[4][2].prompt_scores[0].shape == (8,)
    for (ids_b, lp_b), (ids_s, lp_s) in zip(results[4][2].top, results[1][2].top):
        np.testing.assert_array_equal(ids_b, ids_s)
        np.testing.assert_allclose(lp_b, lp_s, atol=1e-5)


def test_a_prompt_only_request_scores_the_prompt_and_draws_nothing():
    """`max_tokens` 0 with `score_prompt` (an evaluation's log-likelihood): the prompt is scored,
    no token is produced, the slot is free at once."""
    engine = random_engine(make_config(), slots=2)
    s = Scheduler(engine, Tok())
    r = s.submit(Request(np.arange(1, 12, dtype=np.int32), max_tokens=0, score_prompt=True))
    s.run_until_idle()
    assert r.finished.reason == "length" and r.token_ids == [] and r.finished.text == ""
    assert r.prompt_scores[0].shape == (10,) and np.all(r.prompt_scores[0] < 0)
    assert s.busy == 0


def test_several_adapters_in_one_batch_equal_each_served_alone():
    """Two LoRA adapters (ranks 4 and 2) and the bare base, stacked in one engine: requests of
    all three, greedy and seeded, mixed in a busy batch and in batched prefills, give exactly
    the tokens of an engine that serves that adapter alone."""
    from infra.models import lora
    from infra.serve.adapters import stack_params

    config = make_config(LORA, **FEATURES)
    first = random_engine(config, slots=4, seed=0)
    base, one = lora.split(first.params)
    # a rank-2 adapter: a (*in, 2), b (2, *out), unlike the first
    two = _map_adapters(lora.split(random_engine(config, slots=1, seed=3).params)[1],
                        lambda a, b: (a[..., :2], -1.5 * b[:2] + 0.3))
    four = _map_adapters(two, lambda a, b: (  # the same adapter zero-padded to rank 4
        jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, 2)]), jnp.pad(b, [(0, 2)] + [(0, 0)] * (b.ndim - 1))))
    scale = lora.scale_of(config)
    zeros = jax.tree.map(jnp.zeros_like, one)
    alone = [Engine(first._model_def, lora.join(base, ad), config, mesh=first.mesh,
                    rules=first.rules, slots=2, allowed=np.ones(VOCAB, bool))
             for ad in (zeros, one, four)]
    stacked = Engine(first._model_def, stack_params(base, [None, (one, scale), (two, scale)],
                                                    first.mesh),
                     config, mesh=first.mesh, rules=first.rules, slots=4,
                     allowed=np.ones(VOCAB, bool), adapters=3)
    rng = random.Random(4)
    requests = []
    for i in range(9):
        ids = np.asarray([rng.randrange(VOCAB) for _ in range(rng.randint(3, 30))], np.int32)
        sp = SamplingParams() if i % 2 else SamplingParams(temperature=1.0, top_k=8, seed=i)
        requests.append(Request(ids, sp, max_tokens=rng.randint(4, 12), adapter=i % 3))
    groups = []  # the adapters of each prefill call's rows
    original = stacked.prefill
    stacked.prefill = lambda slots: groups.append(
        {stacked.pending[x].adapter for x in slots}) or original(slots)
    s = Scheduler(stacked, Tok())
    for r in requests:
        s.submit(r)
    s.run_until_idle()
    assert max(map(len, groups)) > 1  # short prompts of different adapters in one call
    outputs = {}
    for r in requests:
        ref = Request(r.ids, r.sampling, max_tokens=r.max_tokens)
        sched = Scheduler(alone[r.adapter], Tok())
        sched.submit(ref)
        sched.run_until_idle()
        assert r.token_ids == ref.token_ids, r.adapter
        np.testing.assert_allclose(r.logprobs, ref.logprobs, atol=1e-5)
        outputs[r.adapter] = outputs.get(r.adapter, 0) + 1
    assert outputs == {0: 3, 1: 3, 2: 3}
    # the adapters matter: one prompt, three different greedy continuations
    ids = requests[1].ids
    got = []
    for adapter in range(3):
        r = s.submit(Request(ids, SamplingParams(), max_tokens=12, adapter=adapter))
        s.run_until_idle()
        got.append(tuple(r.token_ids))
    assert len(set(got)) == 3, got


def _map_adapters(adapters: dict, fn) -> dict:
    """`fn(a, b) -> (a, b)` applied to every adapter of a `lora.split` tree."""
    from infra.models import lora

    out = {}
    for k, v in adapters.items():
        if isinstance(k, str) and k.endswith(lora.SUFFIX):
            out[k] = dict(zip(("a", "b"), fn(v["a"], v["b"])))
        else:
            out[k] = _map_adapters(v, fn)
    return out


def _mixed_requests(seed: int, n: int = 32) -> list[Request]:
    """`n` requests of mixed prompt and output lengths, greedy and seeded; a third of them
    share a 35-token prefix (a system prompt)."""
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(35)]
    out = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 24))]
        if i % 3 == 0:
            prompt = system + prompt[:rng.randint(1, 8)]
        sampling = SamplingParams() if i % 2 else SamplingParams(temperature=0.9, top_k=12,
                                                                 seed=rng.randrange(1000))
        out.append(Request(np.asarray(prompt, np.int32), sampling,
                           max_tokens=rng.randint(1, 63 - len(prompt)), top_logprobs=2))
    return out


@pytest.mark.parametrize("devices", [1, 8])
def test_paged_cache_gives_the_tokens_of_a_dense_one(devices):
    """32 concurrent mixed-length requests (greedy and seeded) through a paged cache too small
    for all of them at once (admissions wait, the newest requests are preempted and resumed),
    prefilled in 16-token chunks with a shared prefix reused from cached pages, give the
    tokens and log-probabilities of a dense cache (one context-long page per slot)."""
    config = make_config(**FEATURES)
    devs = jax.devices()[:devices]
    dense = random_engine(config, devices=devs, slots=4, page_size=64)
    paged = random_engine(config, devices=devs, slots=4, page_size=8, num_pages=13,
                          prefill_chunk=16)
    assert dense.pool.num_pages == 5 and paged.cache_bytes() < dense.cache_bytes() / 2
    results = []
    for engine in (dense, paged):
        s = Scheduler(engine, Tok(), max_queue=64)
        requests = [s.submit(r) for r in _mixed_requests(devices)]
        s.run_until_idle()
        results.append(requests)
        assert engine.pool.available() == engine.pool.num_pages - 1  # every page came back
    for a, b in zip(*results):
        assert a.token_ids == b.token_ids and len(a.token_ids) == a.max_tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        for (ia, va), (ib, vb) in zip(a.top, b.top):
            assert list(ia) == list(ib)
    assert sum(r.preemptions for r in results[1]) > 0  # the small cache did preempt
    assert paged.pool.hits >= 8 * 4  # the shared prefix's 4 full pages, reused


def test_an_8192_context_with_16_slots_in_a_quarter_of_the_dense_memory():
    """16 slots of an 8,192-token context with `kv_tokens` = 32,768: the cache takes exactly
    2 x layers x kv_heads x head_dim x 4 bytes per token held (a quarter of 16 full contexts),
    and serves 16 concurrent requests, two of them 2,500-token prompts."""
    config = make_config(max_seq_len=8192)
    engine = random_engine(config, devices=jax.devices()[:1], slots=16,
                           num_pages=1 + 32768 // 16)
    m = config.model
    per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4
    assert engine.cache_bytes() == per_token * (32768 + 16)  # + the trash page
    assert engine.cache_bytes() < per_token * 16 * 8192 / 3.9
    rng = random.Random(8)
    s = Scheduler(engine, Tok())
    requests = [s.submit(Request(np.asarray([rng.randrange(VOCAB) for _ in range(
        2500 if i < 2 else rng.randint(1, 40))], np.int32), max_tokens=8)) for i in range(16)]
    s.run_until_idle()
    assert all(len(r.token_ids) == 8 for r in requests)
    assert engine.pool.available() == engine.pool.num_pages - 1


def test_a_cached_prefix_is_not_computed_again():
    """The second request with a 40-token prefix prefills only what follows its cached full
    pages (one chunk instead of three), and decodes exactly as the first did; two requests
    with one prefix arriving together share it too."""
    config = make_config()
    engine = random_engine(config, slots=2, page_size=8, prefill_chunk=16)
    rng = random.Random(7)
    ids = np.asarray([rng.randrange(VOCAB) for _ in range(45)], np.int32)
    chunks = []
    original = engine.prefill
    engine.prefill = lambda slots: chunks.append(slots) or original(slots)
    s = Scheduler(engine, Tok())
    first = s.submit(Request(ids, max_tokens=8))
    s.run_until_idle()
    calls = len(chunks)
    second = s.submit(Request(ids, max_tokens=8))
    s.run_until_idle()
    assert calls == 3 and len(chunks) - calls == 1  # 45 tokens: 16+16+13; then 40 cached
    assert engine.pool.hits == 40
    assert second.token_ids == first.token_ids
    np.testing.assert_allclose(second.logprobs, first.logprobs, atol=1e-5)
    # arriving together (the `n` choices of one request): the second waits for the first's
    # prefix pages instead of computing them too
    other = np.asarray([rng.randrange(VOCAB) for _ in range(45)], np.int32)
    pair = [s.submit(Request(other, max_tokens=8)) for _ in range(2)]
    s.run_until_idle()
    assert engine.pool.hits == 80 and pair[0].token_ids == pair[1].token_ids


def test_nothing_compiles_after_warm_up():
    """Every prefill bucket, the decode step and release are compiled by `warmup`; a mixed
    workload (all prompt lengths, greedy and sampled, cancellations) compiles nothing. (A
    program loaded from the persistent compilation cache, which tests/conftest.py enables,
    counts as compiled: XLA did not compile it in this process, but it was not ready either.)"""
    compiles = []

    def listener(event, duration, **kwargs):
        if event in ("/jax/core/compile/backend_compile_duration",
                     "/jax/compilation_cache/cache_retrieval_time_sec"):  # a cache hit
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        config = make_config()
        engine = random_engine(config, slots=4)
        engine.warmup()
        assert compiles, "the listener saw no compile at all"
        before = len(compiles)
        s = Scheduler(engine, Tok())
        rng = random.Random(1)
        requests = []
        for length in [1, 2, 15, 16, 17, 31, 32, 33, 50, 63]:
            r = Request(np.asarray([rng.randrange(VOCAB) for _ in range(length)], np.int32),
                        SamplingParams(temperature=rng.choice([0.0, 0.7]), top_k=rng.choice([0, 3]),
                                       seed=rng.randrange(10)),
                        max_tokens=rng.randint(1, 30), stop=("ab",))
            requests.append(s.submit(r))
        s.step()
        s.cancel(requests[1])
        s.run_until_idle()
        assert all(r.finished is not None for r in requests)
        assert requests[-1].finished.reason == "length"  # 63 + 1 fill the context
        assert len(compiles) == before, f"{len(compiles) - before} compiles after warm-up"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_the_cache_sharded_over_8_devices_gives_the_tokens_of_1_device():
    config = make_config(**FEATURES)
    one = random_engine(config, devices=jax.devices()[:1], slots=4)
    eight = random_engine(config, devices=jax.devices(), slots=4)
    assert dict(eight.mesh.shape)["tensor"] == 2 and dict(eight.mesh.shape)["data"] == 4
    spec = eight.cache["k"].sharding.spec
    assert spec[3] == "tensor" and not any(spec[:3]), spec  # kv heads split, pages whole
    shard = eight.cache["k"].addressable_shards[0].data.shape
    assert shard[3] == 1 and shard[1] == eight.pool.num_pages  # one kv head per device
    rng = random.Random(2)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 18, 33, 9, 12)]
    outputs = []
    for engine in (one, eight):
        s = Scheduler(engine, Tok())
        rs = [s.submit(Request(np.asarray(p, np.int32), SamplingParams(
            temperature=0.0 if i % 2 else 0.8, seed=i), max_tokens=16))
            for i, p in enumerate(prompts)]
        s.run_until_idle()
        outputs.append([r.token_ids for r in rs])
    assert outputs[0] == outputs[1]


def test_stop_strings_and_streamed_text():
    """Deltas concatenate to the final text; a stop string ends the request and is not sent."""
    config = make_config()
    engine = random_engine(config, slots=2)
    ids = np.arange(1, 9, dtype=np.int32)
    free = Request(ids, SamplingParams(), max_tokens=20)
    s = Scheduler(engine, Tok())
    s.submit(free)
    s.run_until_idle()
    text = free.finished.text
    assert len(text) == 20 and free.finished.reason == "length"
    stop = text[5:7]
    deltas = []
    r = Request(ids, SamplingParams(), max_tokens=20, stop=("zzzz", stop),
                emit=lambda e: deltas.append(e.text) if isinstance(e, Token) else None)
    s.submit(r)
    s.run_until_idle()
    cut = text.find(stop)
    assert r.finished.reason == "stop" and r.finished.text == text[:cut]
    assert "".join(deltas) == text[:cut]
    assert r.finished.completion_tokens == len(r.token_ids) and r.finished.prompt_tokens == 8
