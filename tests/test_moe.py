"""Mixture of experts (`infra/models/moe.py`): the layer against a reference that sends each
token through its top-k experts one expert at a time, in values and gradients; dropless drops
nothing; the capacity path drops exactly what the rule it states drops; the router statistics
equal their formulas by hand; an MoE model trains through the CLI and logs them."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infra import config as config_lib
from infra.errors import ConfigError, UserError
from infra.models import hyper_params
from infra.models import moe as moe_lib
from infra.models.transformer import MLP
from tests.helpers import cli

D, F, E = 16, 24, 4


def make_layer(*, k=2, capacity_factor=0.0, norm_topk_prob=True, shared=False, seed=0):
    rngs = nnx.Rngs(seed)
    with nnx.use_eager_sharding(False):
        layer = _build(rngs, k, capacity_factor, norm_topk_prob, shared)
    layer.router[...] = 3.0 * layer.router[...]  # decisive routing: top-k is not a near tie
    return layer


def _build(rngs, k, capacity_factor, norm_topk_prob, shared):
    return moe_lib.MoE(
        d_model=D, num_experts=E, experts_per_token=k, hidden=F, out_scale=1.0,
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs, norm_topk_prob=norm_topk_prob,
        capacity_factor=capacity_factor,
        shared=MLP(d_model=D, mlp_dim=8, out_scale=1.0, dtype=jnp.float32,
                   param_dtype=jnp.float32, rngs=rngs) if shared else None)


def reference(layer: moe_lib.MoE, x: jax.Array, kept: np.ndarray | None = None) -> jax.Array:
    """Each expert over every token, weighted by what the token gives it (its probability where
    the expert is among its top k, renormalised; zero elsewhere or where `kept` (tokens, k)
    says the assignment was dropped)."""
    flat = x.reshape(-1, D)
    probs = jax.nn.softmax(flat @ layer.router[...], axis=-1)
    chosen = jnp.argsort(-probs, axis=-1)[:, :layer.k]
    weights = jnp.take_along_axis(probs, chosen, axis=-1)
    if layer.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    if kept is not None:
        weights = weights * kept
    y = jnp.zeros_like(flat)
    for e in range(E):
        given = jnp.sum(jnp.where(chosen == e, weights, 0.0), axis=-1)
        h = jax.nn.silu(flat @ layer.gate[e]) * (flat @ layer.up[e])
        y = y + given[:, None] * (h @ layer.down[e])
    if hasattr(layer, "shared"):
        y = y + layer.shared(flat[None])[0]
    return y.reshape(x.shape)


def _values_and_grads(fn, layer, x):
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y = fn(nnx.merge(graphdef, state), x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y  # every output matters

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return y, jax.tree.leaves(grads)


def _close(a, b, rtol, scale=None):
    """|a - b| <= rtol * the scale of b (or `scale`: a gradient that is zero in exact
    arithmetic, top-1's renormalised router, is compared at its tree's scale)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), scale or 1e-30)
    assert float(np.abs(a - b).max()) <= rtol * scale, (float(np.abs(a - b).max()), scale)


@pytest.mark.parametrize("options", [dict(), dict(norm_topk_prob=False, shared=True),
                                     dict(k=1), dict(capacity_factor=float(E))],
                         ids=["top2", "unnormalised-shared", "top1", "capacity-drops-nothing"])
def test_the_layer_equals_each_token_through_its_top_k_experts(options):
    """Values and gradients (weights, router and input) equal the per-expert reference to
    1e-5 of their scale (float32): dropless, and the capacity path with room for everything."""
    layer = make_layer(**options)
    x = jax.random.normal(jax.random.key(1), (3, 10, D))
    y, grads = _values_and_grads(lambda m, x: m(x)[0], layer, x)
    y_ref, grads_ref = _values_and_grads(reference, layer, x)
    _close(y, y_ref, 1e-5)
    assert len(grads) == len(grads_ref)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 1e-5, scale=0.1 * scale)
    assert float(np.abs(np.asarray(y)).max()) > 0.1


def test_dropless_drops_nothing_however_unbalanced():
    """Every token prefers expert 0: dropless still computes every assignment."""
    layer = make_layer()
    layer.router[...] = layer.router[...].at[:, 0].add(50.0)
    x = jnp.abs(jax.random.normal(jax.random.key(2), (2, 16, D)))  # positive: expert 0 wins
    y, stats = layer(x)
    assert float(stats["dropped"]) == 0.0 and float(stats["load"][0]) == pytest.approx(0.5)
    _close(y, reference(layer, x), 1e-5)


def _kept_by_rule(chosen: np.ndarray, capacity: int) -> np.ndarray:
    """The stated rule, as a loop: first choices of every token (in token order), then second
    choices; an assignment past its expert's `capacity` is dropped."""
    tokens, k = chosen.shape
    taken = np.zeros(E, int)
    kept = np.zeros((tokens, k))
    for j in range(k):
        for t in range(tokens):
            e = chosen[t, j]
            if taken[e] < capacity:
                taken[e] += 1
                kept[t, j] = 1.0
    return kept


def test_capacity_factor_1_drops_exactly_the_assignments_past_each_capacity():
    layer = make_layer(capacity_factor=1.0)
    layer.router[...] = layer.router[...].at[:, 1].add(1.5)  # expert 1 is over-subscribed
    x = jax.random.normal(jax.random.key(3), (2, 12, D))
    flat = x.reshape(-1, D)
    probs = np.asarray(jax.nn.softmax(flat @ layer.router[...], axis=-1))
    chosen = np.argsort(-probs, axis=-1)[:, :2]
    capacity = moe_lib.capacity(24, 2, E, 1.0)
    assert capacity == 12
    kept = _kept_by_rule(chosen, capacity)
    assert 0 < kept.sum() < kept.size  # some are dropped, not all
    y, stats = layer(x)
    assert float(stats["dropped"]) == pytest.approx(1 - kept.mean())
    _close(y, reference(layer, x, jnp.asarray(kept)), 1e-5)


def test_router_statistics_equal_their_formulas_by_hand():
    """Four tokens, three experts, top 1, fixed logits: the load-balancing loss E * sum f_e P_e,
    the z-loss mean(logsumexp^2), loads, entropy."""
    logits = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    probs, weights, experts = moe_lib.route(logits, 1, True)
    stats = moe_lib.router_stats(logits, probs, experts, None)
    p = np.exp(np.asarray(logits))
    p /= p.sum(-1, keepdims=True)
    f = np.array([2, 1, 1]) / 4  # tokens 0 and 2 choose expert 0, token 1 expert 1, token 3 expert 2
    assert np.asarray(experts)[:, 0].tolist() == [0, 1, 0, 2]
    np.testing.assert_allclose(weights, 1.0)  # renormalised over one choice
    assert float(stats["aux_loss"]) == pytest.approx(3 * np.sum(f * p.mean(0)), rel=1e-6)
    lse = np.log(np.exp(np.asarray(logits)).sum(-1))
    assert float(stats["z_loss"]) == pytest.approx(np.mean(lse ** 2), rel=1e-6)
    np.testing.assert_allclose(stats["load"], f, rtol=1e-6)
    assert float(stats["entropy"]) == pytest.approx(-np.mean(np.sum(p * np.log(p), -1)), rel=1e-6)
    # uniform routing: the load-balancing loss is k
    flat = jnp.zeros((6, 3))
    probs, _, experts = moe_lib.route(flat, 2, True)
    assert float(moe_lib.router_stats(flat, probs, experts, None)["aux_loss"]) == pytest.approx(2.0)


def test_moe_config_counts_and_refusals():
    c = config_lib.load("experiments/lm.py:moe-tiny")
    m, dense = hyper_params(c.model), hyper_params(config_lib.load("experiments/lm.py:tiny").model)
    router = 4 * 256 * 8
    assert m.active_params == dense.num_params + router  # same active MLP width as tiny
    assert m.num_params == dense.num_params + router + 4 * 3 * 256 * 384 * 6
    assert m.matmul_params == dense.matmul_params + router
    with pytest.raises(ConfigError, match="experts_per_token"):
        config_lib.load("experiments/lm.py:moe-smoke", {"model.experts_per_token": 5})
    with pytest.raises(ConfigError, match="scan_layers"):
        config_lib.load("experiments/lm.py:moe-smoke", {"model.scan_layers": True,
                                                         "model.dense_layers": "0"})
    with pytest.raises(ConfigError, match="dense_layers"):
        config_lib.load("experiments/lm.py:moe-smoke", {"model.dense_layers": "0,x"})
    mixed = hyper_params(config_lib.load("experiments/lm.py:moe-smoke",
                                         {"model.moe_every": 2}).model)
    assert [mixed.is_moe_layer(i) for i in range(2)] == [False, True]


def test_experts_that_do_not_split_over_the_expert_axis_are_refused_before_the_run_starts(
        tmp_path):
    """4 experts on mesh.expert=8: one line naming both keys, exit code 2, nothing written."""
    from infra import train

    cfg = config_lib.load("experiments/lm.py:moe-smoke", {"mesh.expert": 8, "mesh.data": 1})
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"num_experts \(4\) must be a multiple of "
                                          r"mesh.expert \(8\).*mesh.expert=4") as e:
        train.run(cfg, workdir)
    assert e.value.exit_code == 2
    assert not workdir.exists() or not any(workdir.iterdir())


def test_an_moe_model_trains_and_logs_its_routers_in_both_layer_layouts(tmp_path):
    """`lm.py:moe-smoke` on 8 CPU devices: the loop and scan layouts give the same losses;
    metrics.jsonl has the router losses, per-expert loads (summing to 1), the dropped fraction
    and the router entropy, for training and evaluation."""
    from infra import train

    runs = {}
    for scan in (False, True):
        workdir = tmp_path / f"scan-{scan}"
        cfg = config_lib.load("experiments/lm.py:moe-smoke", {
            **MESH_BASE, "train.steps": 6, "train.eval_every": 6, "model.scan_layers": scan})
        train.run(cfg, workdir)
        runs[scan] = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = {scan: [r["train/loss"] for r in records if "train/loss" in r]
              for scan, records in runs.items()}
    assert len(losses[False]) == 6 and losses[False][-1] < losses[False][0]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    last = [r for r in runs[False] if "train/loss" in r][-1]
    loads = [last[f"train/moe/load/{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5) and min(loads) > 0
    assert last["train/moe/dropped_fraction"] == 0.0
    assert 0 < last["train/moe/router_entropy"] <= math.log(4) + 1e-6
    assert last["train/moe/aux_loss"] >= 2.0 - 1e-4  # k at best (balanced)
    assert any("eval/moe/aux_loss" in r for r in runs[False])


def test_the_blocked_grouped_matmul_equals_ragged_dot():
    """CPU's grouped matmul (blocks of 4 rows here) against `jax.lax.ragged_dot`, in values and
    gradients, with an empty group and groups that are not multiples of the block."""
    sizes = jnp.asarray([5, 0, 9, 1, 3], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (18, 6))
    w = jax.random.normal(jax.random.key(1), (5, 6, 7))

    def run(fn):
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)

    blocked = run(lambda x, w: moe_lib.blocked_matmul(x, w, sizes, block=4))
    ragged = run(lambda x, w: jax.lax.ragged_dot(x, w, sizes))
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(ragged)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moe_lib.blocked_matmul(x, w, sizes, block=4),
                               jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)


def test_plan_reports_active_parameters_and_expert_bytes_per_device():
    """The released Qwen3-30B-A3B config planned on 8 devices (fsdp=8): 30.5B parameters of
    which 3.35B active per token, as published; the experts' weights split 8 ways."""
    from infra.plan import format_plan, plan

    p = plan(config_lib.load("experiments/llama.py:qwen3-30b-a3b"), devices=8,
             mesh={"fsdp": 8}, compile=False)
    assert round(p.param_count / 1e9, 1) == 30.5 and round(p.active_param_count / 1e9, 2) == 3.35
    assert p.expert_bytes_total == 48 * 128 * 3 * 2048 * 768 * 4  # float32
    assert p.expert_bytes == p.expert_bytes_total // 8
    assert "3.353B parameters active per token of 30.532B" in format_plan(p)
    # experts over expert=4: each device keeps its quarter of them, and every MoE layer moves
    # its tokens (all-gather + reduce-scatter, forward, backward and remat's recompute)
    p = plan(config_lib.load("experiments/llama.py:qwen3-30b-a3b"), devices=8,
             mesh={"fsdp": 2, "expert": 4}, compile=False)
    assert p.expert_bytes == p.expert_bytes_total // 8
    dispatch = [c for c in p.collectives if c.what.startswith("expert dispatch")]
    tokens = 64 * 4096 / 8  # per device
    assert len(dispatch) == 1 and dispatch[0].axes == ("expert",)
    assert dispatch[0].ici_bytes == pytest.approx(48 * 6 * tokens * 4 * 2048 * 2 * 3 / 4)
    assert not any("all-gather weights" in c.what and "expert" in c.axes for c in p.collectives)


def test_hf_config_of_experts_round_trips():
    """Qwen3-MoE's dense layers (mlp_only_layers, decoder_sparse_step) and renormalisation, and
    Mixtral's expert count, map to model.* and back."""
    from infra.interop.hf_config import architecture_for, from_hf, to_hf

    qwen = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 2,
            "mlp_only_layers": [3], "router_aux_loss_coef": 0.01, "output_router_logits": True}
    model = from_hf(qwen)
    assert (model["num_experts"], model["experts_per_token"], model["moe_intermediate_size"],
            model["moe_every"], model["dense_layers"], model["norm_topk_prob"],
            model["qk_norm"], model["router_aux_loss"]) == (8, 2, 32, 2, "3", True, True, 0.01)
    full = {**config_lib.load("experiments/lm.py:smoke").model.to_dict(), **model}
    assert architecture_for(full) == "Qwen3MoeForCausalLM"
    back = to_hf(full, architecture="Qwen3MoeForCausalLM", bos_token_id=1, eos_token_id=2,
                 dtype="float32")
    assert {k: back[k] for k in ("num_experts", "decoder_sparse_step", "mlp_only_layers",
                                 "moe_intermediate_size", "norm_topk_prob")} == \
        {"num_experts": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3],
         "moe_intermediate_size": 32, "norm_topk_prob": True}
    m = hyper_params(config_lib.load("experiments/lm.py:smoke", {
        f"model.{k}": v for k, v in model.items() if k != "name"}).model)
    assert [m.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    mixtral = from_hf({**qwen, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                       "num_local_experts": 8, "output_router_logits": False})
    assert mixtral["moe_intermediate_size"] == 128 and mixtral["router_aux_loss"] == 0.0
    with pytest.raises(UserError, match="no transformers architecture"):
        architecture_for({**full, "qk_norm": False})  # dense layers: not Mixtral


EXPERT_MESHES = {
    "data=2,expert=4": {"mesh.data": 2, "mesh.expert": 4},
    "fsdp=2,expert=4": {"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4},
    "expert=2,tensor=2,data=2": {"mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2},
}
MESH_BASE = {"train.steps": 10, "train.log_every": 1, "train.eval_every": 10,
             "train.progress_bar": False, "sharding.print_table": False,
             "checkpoint.every": 1000}


def _train_moe(workdir, **overrides):
    from infra import train

    cfg = config_lib.load("experiments/lm.py:moe-smoke", {**MESH_BASE, **overrides})
    _, history = train.run(cfg, workdir)
    return np.array([r["train/loss"] for r in history if "train/loss" in r])


@pytest.fixture(scope="module")
def data8_losses(tmp_path_factory):
    return _train_moe(tmp_path_factory.mktemp("moe") / "data8", **{"mesh.data": 8})


@pytest.mark.parametrize("mesh", list(EXPERT_MESHES))
def test_expert_parallel_meshes_give_the_same_training(tmp_path, data8_losses, mesh):
    """10 steps of `lm.py:moe-smoke` with the experts split over `expert` (dispatch in
    shard_map) equal data=8's losses to 1e-4 (relative)."""
    losses = _train_moe(tmp_path / "run", **EXPERT_MESHES[mesh])
    assert len(losses) == len(data8_losses) == 10
    diff = float(np.max(np.abs(losses - data8_losses) / np.abs(data8_losses)))
    print(f"{mesh}: max relative loss difference {diff:.2e}")
    assert diff <= 1e-4


def test_expert_weights_are_split_over_the_expert_axis():
    from infra import train

    cfg = config_lib.load("experiments/lm.py:moe-smoke",
                          {**MESH_BASE, **EXPERT_MESHES["fsdp=2,expert=4"]})
    params = train.build(cfg).state.abstract["params"]
    gate = params["blocks"][0]["moe"]["gate"]
    assert gate.shape == (4, 64, 64)
    assert gate.sharding.shard_shape(gate.shape) == (1, 32, 64)  # experts / 4, embed / fsdp 2
    down = params["blocks"][0]["moe"]["down"]
    assert down.sharding.shard_shape(down.shape) == (1, 64, 32)


def test_sigkill_and_resume_of_an_expert_parallel_run_is_bit_identical(tmp_path):
    """`lm.py:moe-smoke` on data=2 x expert=4 through the CLI, killed (SIGKILL) after a
    checkpoint and resumed: the same losses, bit for bit, and the same final weights as a run
    never interrupted."""
    import orbax.checkpoint as ocp

    from tests.helpers import kill_when, popen

    run = ("--config", "experiments/lm.py:moe-smoke", "--config.train.steps=8",
           "--config.train.log_every=1", "--config.train.eval_every=8",
           "--config.checkpoint.every=4", "--config.sharding.print_table=false",
           "--config.mesh.data=2", "--config.mesh.expert=4")

    def losses(workdir):
        return [(r["step"], r["train/loss"]) for r in map(
            json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the killed run and its resumption load the straight run's programs from the session's
    # compilation cache (tests/conftest.py)
    assert cli("train", *run, "--workdir", str(straight)).returncode == 0
    proc = popen("train", *run, "--workdir", str(killed))
    committed = killed / "checkpoints" / "4" / "_CHECKPOINT_METADATA"
    kill_when(lambda: committed.exists() and any(s >= 5 for s, _ in losses(killed)), proc)
    p = cli("train", *run, "--workdir", str(killed))
    assert p.returncode == 0 and "resumed from step" in p.stderr, p.stderr[-2000:]
    assert losses(killed) == losses(straight)
    final = [ocp.StandardCheckpointer().restore(w / "checkpoints" / "8" / "state")
             for w in (straight, killed)]
    for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_router_statistics_are_averaged_over_the_moe_layers_only():
    """Layers 0 and 2 with experts, 1 and 3 dense (`dense_layers`): the logged statistics are
    the mean of the two MoE layers' own, whatever order the dense layers come in."""
    from infra.models import build_model

    cfg = config_lib.load("experiments/lm.py:moe-smoke", {
        "model.num_layers": 4, "model.dense_layers": "1,3", "model.router_aux_loss": 1.0})
    with nnx.use_eager_sharding(False):
        model = build_model(cfg.model, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    _, _, router = model.token_losses(tokens, tokens)
    x = model.embed(tokens)
    per_layer = []
    for block in model.blocks:
        x, stats = block.forward(x, jnp.arange(16))
        if stats:
            per_layer.append(stats)
    assert len(per_layer) == 2 and model.moe_layers == 2
    mean_aux = (per_layer[0]["aux_loss"] + per_layer[1]["aux_loss"]) / 2
    assert float(router.metrics["moe/aux_loss"]) == pytest.approx(float(mean_aux), rel=1e-6)
    assert float(router.loss) == pytest.approx(float(mean_aux) + 0.001 * float(
        router.metrics["moe/z_loss"]), rel=1e-6)


def test_lora_fine_tunes_the_attention_of_an_expert_parallel_moe_model(tmp_path):
    """LoRA (rank 4 on q/k/v/o) on `lm.py:moe-smoke` over data=2 x expert=4: the adapters train,
    the experts and the router stay bit for bit as initialised."""
    from infra import train
    from infra.models import lora

    cfg = config_lib.load("experiments/lm.py:moe-smoke", {
        **MESH_BASE, **EXPERT_MESHES["data=2,expert=4"], "train.steps": 3,
        "train.eval_every": 3, "finetune.lora.rank": 4, "finetune.lora.targets": "attn/(q|k|v|o)"})
    trainer = train.build(cfg)
    initial = jax.device_get(trainer.state.init(jax.random.key(cfg.train.seed))["params"])
    state, history = train.run(cfg, tmp_path / "lora")
    final = jax.device_get(state["params"])
    assert np.isfinite([r["train/loss"] for r in history if "train/loss" in r]).all()
    base0, adapters0 = lora.split(initial)
    base1, adapters1 = lora.split(final)
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(base1)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters0),
                                                        jax.tree.leaves(adapters1)))
    assert "moe" in final["blocks"][0] and "q_lora" in final["blocks"][0]["attn"]
