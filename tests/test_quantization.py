"""Low precision with qwix: quantization-aware training (`model.quantization`), int8 weights
(`serve --quantize int8`) and an int8 KV cache (`serve --kv_cache int8`) for serving.

References: the quantization-aware product against fake quantization written out in numpy;
training and serving against the same model in float32."""
import random

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from infra import config as config_lib
from infra import train
from infra.models.projection import project

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def _fake_quant(x: np.ndarray, axes: tuple[int, ...], mode: str) -> np.ndarray:
    """`x` rounded to `mode` with one absmax scale per slice over `axes`, back in float (int8:
    absmax maps to 127.5, the top of 127's rounding interval, as in qwix)."""
    absmax = np.abs(x).max(axis=axes, keepdims=True)
    if mode == "int8":
        scale = absmax / 127.5
        return np.clip(np.round(x / scale), -128, 127) * scale
    scale = absmax / FP8_MAX
    return (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def _positive_peaks(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """`x` with each slice over `axes` negated where its largest magnitude is negative: that
    element maps to exactly -127.5 in int8, a rounding tie that division and multiplication by
    the reciprocal (XLA's choice) break differently; +127.5 gives 127 either way."""
    moved = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    flat = moved.reshape(*moved.shape[:moved.ndim - len(axes)], -1)
    peak = np.take_along_axis(flat, np.abs(flat).argmax(-1)[..., None], -1)
    return np.moveaxis((np.sign(peak) * flat).reshape(moved.shape),
                       tuple(range(-len(axes), 0)), axes)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_the_quantized_product_is_fake_quantization_of_both_operands(mode):
    """Activations per token, weights per output channel (o's weight has two input dims); the
    gradients pass straight through to the float operands unless the backward is quantized."""
    rng = np.random.default_rng(0)
    # o's input (batch, length, heads, head_dim) and weight (heads, head_dim, d_model)
    x = _positive_peaks(rng.normal(size=(2, 5, 4, 8)).astype(np.float32), (2, 3))
    w = _positive_peaks((rng.normal(size=(4, 8, 16)) / 6).astype(np.float32), (0, 1))
    ref = np.einsum("blhd,hde->ble", _fake_quant(x, (2, 3), mode), _fake_quant(w, (0, 1), mode))
    y = project(jnp.asarray(x), jnp.asarray(w), 2, quantization=mode)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    def loss(x, w, **kw):
        return jnp.sum(jnp.sin(project(x, w, 2, **kw)))

    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("blhd,hde->ble", x, w))),
                     argnums=(0, 1))
    cos = np.cos(ref)  # the straight-through gradient: d sin(y) at the quantized y
    grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), quantization=mode)
    np.testing.assert_allclose(grads[0], np.einsum("ble,hde->blhd", cos, w), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], np.einsum("blhd,ble->hde", x, cos), rtol=1e-4, atol=1e-5)
    # quantized gradients: close to the float ones, not equal
    qgrads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), quantization=mode,
                                            backward=True)
    float_grads = g_ref(jnp.asarray(x), jnp.asarray(w))
    for q, f in zip(qgrads, float_grads):
        error = float(jnp.linalg.norm(q - f) / jnp.linalg.norm(f))
        assert 1e-4 < error < 0.15, error


def _train(tmp_path, name: str, **model):
    config = config_lib.load("experiments/lm.py:smoke", {
        **{f"model.{k}": v for k, v in model.items()},
        "train.steps": 30, "train.eval_every": 30, "checkpoint.every": 30})
    state, events = train.run(config, tmp_path / name)
    return config, state, [e for e in events if "eval/loss" in e]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lm.py:smoke trained 30 steps in float32, int8 and fp8 (e4m3 forward, e5m2 gradients)."""
    root = tmp_path_factory.mktemp("quant")
    return {"none": _train(root, "none"), "int8": _train(root, "int8", quantization="int8"),
            "fp8": _train(root, "fp8", quantization="fp8", quantize_backward=True),
            "root": root}


def test_quantization_aware_training_tracks_float32(runs):
    """The final eval loss within 3% (int8) / 6% (fp8) of float32's, and the trained weights'
    logits through the quantized products within 2% / 6% of the float ones; the checkpoint and
    its parameters stay float32. (The initial weights' logits differ more: see
    scripts/bench_quant.py.)"""
    from infra import run as run_lib

    config, _, float_evals = runs["none"]
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, config.model.vocab_size)
    models = {}
    for mode, bound_logits, bound_loss in (("int8", 0.02, 0.03), ("fp8", 0.06, 0.06)):
        qconfig, _, evals = runs[mode]
        first = evals[0]["eval/loss"], float_evals[0]["eval/loss"]
        last = evals[-1]["eval/loss"], float_evals[-1]["eval/loss"]
        print(f"\n{mode}: eval loss at step 0 {first[0]:.4f} vs {first[1]:.4f}, at step 30 "
              f"{last[0]:.4f} vs {last[1]:.4f}")
        assert abs(last[0] - last[1]) <= bound_loss * last[1]
        sharded, _ = run_lib.sharded_model(qconfig)
        params, _ = run_lib.load_params(runs["root"] / mode, qconfig, sharded.abstract["params"],
                                        step=30)
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
        models[mode] = sharded.model, params
    float_def, params = run_lib.sharded_model(config)[0].model, models["int8"][1]
    reference = float_def.merge(params)(tokens)
    for mode, bound in (("int8", 0.02), ("fp8", 0.06)):
        logits = models[mode][0].merge(params)(tokens)
        error = float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference))
        print(f"{mode}: logits within {error:.2%} of float32")
        assert error <= bound


def _greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from infra.serve.engine import SamplingParams
    from infra.serve.scheduler import Request, Scheduler

    scheduler = Scheduler(engine, engine.tokenizer, max_queue=len(prompts))
    requests = [scheduler.submit(Request(np.asarray(p, np.int32), SamplingParams(),
                                         max_tokens=max_tokens)) for p in prompts]
    scheduler.run_until_idle()
    return [r.token_ids for r in requests]


def _agreement(engine, prompts: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's greedy tokens that `engine` predicts too (top-1) at the same
    position after the same prefix (the float model's continuation, scored as a prompt).
    Free-running decodes are compared too, but printed only: after one near-tie flips, the
    rest of a sequence differs whatever the precision."""
    from infra.serve.scheduler import Request, Scheduler

    scheduler = Scheduler(engine, engine.tokenizer, max_queue=len(prompts))
    requests = [scheduler.submit(Request(np.asarray(p + r, np.int32), max_tokens=0,
                                         score_prompt=True)) for p, r in zip(prompts, reference)]
    scheduler.run_until_idle()
    same = sum(int(np.sum(q.prompt_scores[1][len(p) - 1:, 0] == r))
               for q, p, r in zip(requests, prompts, reference))
    return same / sum(len(r) for r in reference)


def _free_running(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))


def _served_like_float(workdir, texts: list[str], bound_bytes: float, devices: int = 8):
    """int8 weights, and an int8 KV cache, each agree with the float model on >= 95% of greedy
    tokens; their bytes are within `bound_bytes` of float32's."""
    from infra.serve.engine import Engine
    from infra.serve.quantize import weight_bytes

    from infra.mesh import serve_mesh
    from infra.run import load_config

    mesh = serve_mesh(load_config(workdir), devices=jax.devices()[:devices])
    float_engine = Engine.from_workdir(workdir, slots=8, mesh=mesh)
    # at most 48 prompt tokens: prompt + 32 generated fit every context here (128 and up)
    prompts = [list(float_engine.tokenizer.encode(t))[:48] for t in texts]
    reference = _greedy(float_engine, prompts, 32)
    int8 = Engine.from_workdir(workdir, slots=8, mesh=mesh, quantize="int8")
    quantized, as_float32 = weight_bytes(int8.params)
    weights_ratio = quantized / as_float32
    kv8 = Engine.from_workdir(workdir, slots=8, mesh=mesh, kv_cache="int8")
    cache_ratio = kv8.cache_bytes() / float_engine.cache_bytes()
    agree = {"weights": _agreement(int8, prompts, reference),
             "kv cache": _agreement(kv8, prompts, reference)}
    free = {"weights": _free_running(reference, _greedy(int8, prompts, 32)),
            "kv cache": _free_running(reference, _greedy(kv8, prompts, 32))}
    print(f"\nint8 projection weights: {weights_ratio:.3f}x float32's bytes; int8 KV cache: "
          f"{cache_ratio:.3f}x; float32's greedy tokens predicted: " +
          ", ".join(f"{k} {v:.1%}" for k, v in agree.items()) + "; free-running: " +
          ", ".join(f"{k} {v:.1%}" for k, v in free.items()))
    head_dim = int(float_engine.config.model.head_dim)
    # int8 values and one float32 scale per position and head, against float32 values
    assert weights_ratio <= bound_bytes and cache_ratio <= (head_dim + 4) / (4 * head_dim)
    assert min(agree.values()) >= 0.95


def test_int8_weights_and_kv_cache_serve_the_trained_model_like_float32(runs):
    """lm.py:smoke after 30 steps, on 8 devices: 32 prompts x 32 greedy tokens."""
    rng = random.Random(0)
    text = open(__file__).read()
    starts = [rng.randrange(len(text) - 16) for _ in range(32)]
    _served_like_float(runs["root"] / "none", [text[s:s + rng.randint(4, 16)] for s in starts],
                       0.27)


def test_int8_weights_and_kv_cache_serve_an_imported_model_like_float32(llama_dir, tmp_path):
    """A random Llama made by transformers (weights at a realistic scale), imported; 1 device."""
    from infra.interop.importer import import_hf

    workdir = import_hf(llama_dir, tmp_path / "llama")
    rng = random.Random(1)
    words = ("the model serves int8 weights and a cache of keys and values for every token "
             "in the prompt while the float reference decodes greedily").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(32)]
    _served_like_float(workdir, texts, 0.27, devices=1)
