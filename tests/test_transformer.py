"""Tests of the decoder-only transformer and the model registry (CPU, 8 emulated devices)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from infra import sharding
from infra.config import DEFAULT_RULES
from infra.errors import ConfigError
from infra.models import available_models, build_model, get_model_class
from infra.models.transformer import Transformer

TINY = dict(name="transformer", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=16)
ALLOWED_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}
RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")]
# flax passes logical names without a rule through unchanged (they would then be read as mesh
# axis names), so names meant to be replicated need an explicit None rule.
REPLICATED = [("head_dim", None), ("norm", None)]


def make(seed: int = 0, **overrides) -> Transformer:
    """Build eagerly (no mesh), the way the stack does inside eval_shape / jit."""
    with nnx.use_eager_sharding(False):
        return build_model({**TINY, **overrides}, rngs=nnx.Rngs(seed))


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"],
                              dtype=jnp.int32)


def apply(model, x: jax.Array) -> jax.Array:
    """model(x) under jax.jit on split state (eager op-by-op dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, x)


def param_leaves(model) -> dict:
    """{path string: nnx.Param} for every Param in the model."""
    return {"/".join(map(str, path)): var for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)}


# 1. shape, dtype, causality -------------------------------------------------------------------

def test_output_shape_dtype_and_causality():
    model = make()
    x = tokens()
    logits = apply(model, x)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    t = 7
    x2 = x.at[:, t].set((x[:, t] + 1) % 64)
    logits2 = apply(model, x2)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits2[:, :t]))
    assert not np.allclose(np.asarray(logits[:, t:]), np.asarray(logits2[:, t:]))


# 2. attention math against jax.nn.dot_product_attention ---------------------------------------

def _rope_complex(x, theta=10000.0):
    """Reference RoPE: pairs (x[i], x[i + half]) as complex numbers rotated by pos * freq_i."""
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half) / half)
    angle = np.arange(x.shape[1])[:, None] * freq[None, :]
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1).astype(np.float32)


@pytest.mark.parametrize("num_kv_heads,causal_blocks", [(4, 4), (2, 4), (1, 4), (2, 1), (2, 3)])
def test_attention_matches_reference(num_kv_heads, causal_blocks):
    model = make(num_kv_heads=num_kv_heads, causal_blocks=causal_blocks)
    attn = model.blocks[0].attn
    x = jax.random.normal(jax.random.key(3), (2, 10, 32), jnp.float32)
    out = attn(x, jnp.arange(10))

    xn = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", xn, np.asarray(attn.q[...]))
    k = np.einsum("btd,dkh->btkh", xn, np.asarray(attn.k[...]))
    v = np.einsum("btd,dkh->btkh", xn, np.asarray(attn.v[...]))
    q, k = _rope_complex(q), _rope_complex(k)
    group = 4 // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2).astype(np.float32)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
    ref = jnp.einsum("btnh,nhd->btd", ref, attn.o[...])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_causal_blocks_equal_the_whole_matrix_in_values_and_gradients():
    """Query blocks skip only masked keys: logits and every gradient match causal_blocks=1."""
    x = tokens(batch=2, length=13)
    grads = {}
    for blocks in (1, 2, 4, 13):
        model = make(causal_blocks=blocks)
        graphdef, state = nnx.split(model)
        assert len(model.blocks[0].attn._query_blocks(13)) == blocks

        def loss(st):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, st)(x)))

        value, g = jax.jit(jax.value_and_grad(loss))(state)
        grads[blocks] = (value, g)
    for blocks in (2, 4, 13):
        np.testing.assert_allclose(grads[blocks][0], grads[1][0], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads[blocks][1]), jax.tree.leaves(grads[1][1])):
            assert_close_at_scale(np.asarray(a), np.asarray(b))


def assert_close_at_scale(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4,
                          atol: float = 1e-5) -> None:
    """assert_allclose with `atol` scaled by the array's largest magnitude (when above 1).

    A float32 sum's rounding error is relative to its largest terms, not to each result, and
    the summation order varies with the blocks and with XLA's threading: an element that sums
    large terms to a small value differs by about eps x the array's scale, not eps x itself.
    """
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def test_causal_blocks_fall_back_to_one_when_length_is_sharded():
    attn = make(causal_blocks=4).blocks[0].attn
    assert attn._query_blocks(12) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    axes = ("data", "fsdp", "sequence", "expert", "tensor")
    mesh = jax.make_mesh((2, 1, 2, 1, 2), axes, axis_types=(jax.sharding.AxisType.Auto,) * 5)
    with sharding.activation_rules(mesh, DEFAULT_RULES):
        assert sharding.activation_shards("length") == 2
        assert attn._query_blocks(12) == [(0, 12)]  # a block would cross device boundaries
    mesh = jax.make_mesh((8, 1, 1, 1, 1), axes, axis_types=(jax.sharding.AxisType.Auto,) * 5)
    with sharding.activation_rules(mesh, DEFAULT_RULES):
        assert sharding.activation_shards("length") == 1
        assert len(attn._query_blocks(12)) == 4


def test_loss_blocks_equal_all_logits_at_once_in_values_and_gradients():
    """Blocked cross-entropy (packed rows: positions and segments) gives the per-token losses,
    the argmax hits and every gradient of computing all logits at once."""
    x, targets = tokens(batch=2, length=12), tokens(batch=2, length=12, seed=2)
    positions = jnp.array([list(range(5)) + list(range(7))] * 2)
    segments = jnp.array([[1] * 5 + [2] * 7] * 2)
    results = {}
    for blocks in (1, 3, 4):
        graphdef, state = nnx.split(make(loss_blocks=blocks))

        def loss(st):
            nll, correct, _ = nnx.merge(graphdef, st).token_losses(
                x, targets, positions=positions, segment_ids=segments)
            return jnp.mean(nll), (nll, correct)

        results[blocks] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    (_, (nll, correct)), grads = results[1]
    logits = apply(make(), x)  # unpacked rows: only the argmax / shape contract is compared
    assert nll.shape == correct.shape == logits.shape[:2]
    for blocks in (3, 4):
        (_, (nll_b, correct_b)), grads_b = results[blocks]
        np.testing.assert_allclose(nll_b, nll, rtol=1e-6)
        np.testing.assert_array_equal(correct_b, correct)
        for a, b in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads)):
            assert_close_at_scale(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of model.loss_blocks"):
        make(loss_blocks=5).token_losses(x, targets)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_invalid_causal_blocks_raises_config_error(bad):
    with pytest.raises(ConfigError, match="causal_blocks"):
        make(causal_blocks=bad)
    with pytest.raises(ConfigError, match="loss_blocks"):
        make(loss_blocks=bad)


def test_rope_scores_depend_only_on_relative_position():
    from infra.models.transformer import rope
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(i, j):
        return float(jnp.sum(rope(q, jnp.array([i]), 10000.0) * rope(k, jnp.array([j]), 10000.0)))

    assert math.isclose(score(3, 1), score(12, 10), rel_tol=1e-4, abs_tol=1e-5)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


# 3. parameter sets and logical-axis annotations -------------------------------------------------

def test_tied_untied_params_and_annotations():
    tied, untied = param_leaves(make()), param_leaves(make(tie_embeddings=False))
    assert "unembedding" in untied and "unembedding" not in tied
    assert set(untied) - set(tied) == {"unembedding"}
    assert {"embedding", "final_norm/scale", "blocks/0/attn/q", "blocks/1/mlp/down"} <= set(tied)
    for name, var in untied.items():
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None, name
        assert len(axes) == var[...].ndim, name
        assert set(axes) <= ALLOWED_AXES, (name, axes)
        assert var[...].dtype == jnp.float32
    assert untied["unembedding"].get_metadata()["out_sharding"] == ("embed", "vocab")
    assert untied["blocks/0/attn/k"].get_metadata()["out_sharding"] == (
        "embed", "kv_heads", "head_dim")
    model = make()
    # The Params are the whole state: no RNG or other variables kept in the module.
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(model, nnx.Param))


def test_bad_head_counts_raise_config_error():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        make(num_heads=4, num_kv_heads=3)


# 4. the stack's pure-dict workflow: eval_shape, specs, sharded init, jit + grad -------------------

def _abstract_and_specs(cfg):
    abstract = nnx.eval_shape(lambda: make(**cfg))
    with nnx.logical_axis_rules(RULES + REPLICATED):
        specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    return abstract, nnx.to_pure_dict(specs)


def _init_fn(cfg):
    def init():
        return nnx.to_pure_dict(nnx.state(make(**cfg), nnx.Param))
    return init


def _loss_fn(abstract):
    graphdef, abstract_state = nnx.split(abstract)

    def loss(params, x):
        state = jax.tree.map(lambda a: a, abstract_state)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        logits = model(x[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))

    return loss


@pytest.mark.parametrize("tie", [True, False])
def test_pure_dict_workflow_sharded_init_and_grad(tie):
    cfg = dict(tie_embeddings=tie)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract, specs = _abstract_and_specs(cfg)
    assert specs["embedding"] == P("tensor", "fsdp")
    assert specs["blocks"][0]["attn"]["q"] == P("fsdp", "tensor", None)
    assert specs["blocks"][0]["mlp"]["down"] == P("tensor", "fsdp")
    assert specs["final_norm"]["scale"] == P(None)
    with nnx.logical_axis_rules(RULES):  # the pass-through that REPLICATED guards against
        raw = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
    assert raw["final_norm"]["scale"] == P("norm")
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.jit(_init_fn(cfg), out_shardings=shardings)()

    flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs))
    assert flat_params.keys() == flat_specs.keys()
    for path, arr in flat_params.items():
        assert arr.sharding.spec == flat_specs[path], jax.tree_util.keystr(path)

    # Same values as an unsharded eager build with the same seed.
    eager = nnx.to_pure_dict(nnx.state(make(**cfg), nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                 params, eager)

    x = jax.device_put(tokens(batch=4, length=9), NamedSharding(mesh, P(("data", "fsdp"))))
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(abstract)))(params, x)
    assert np.isfinite(float(loss)) and abs(float(loss) - math.log(64)) < 1.0
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert float(jnp.max(jnp.abs(g))) > 0, name


# 5. registry and config errors ----------------------------------------------------------------

def test_registry_errors():
    assert "transformer" in available_models()
    assert get_model_class("transformer") is Transformer
    with pytest.raises(ConfigError, match=r"unknown model 'gpt'.*model\.name.*transformer"):
        build_model({**TINY, "name": "gpt"}, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.n_layers") as info:
        build_model({**TINY, "n_layers": 3}, rngs=nnx.Rngs(0))
    assert "num_layers" in str(info.value) and "\n" not in str(info.value)
    missing = {k: v for k, v in TINY.items() if k != "mlp_dim"}
    with pytest.raises(ConfigError, match=r"model\.mlp_dim"):
        build_model(missing, rngs=nnx.Rngs(0))
    cfg = dict(TINY)
    make()  # build_model must not mutate its input
    assert cfg == TINY


def test_too_long_sequence_raises_config_error():
    model = make()
    with pytest.raises(ConfigError, match=r"sequence length 17 exceeds model\.max_seq_len 16"):
        model(tokens(length=17))
    with pytest.raises(ConfigError, match="max_seq_len"):
        jax.jit(lambda t: model(t))(tokens(length=17))


# 6. mixed precision ---------------------------------------------------------------------------

def test_bfloat16_compute_close_to_float32():
    x = tokens()
    ref = apply(make(), x)
    model = make(dtype="bfloat16")
    assert all(v[...].dtype == jnp.float32 for v in param_leaves(model).values())
    out = apply(model, x)
    assert out.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.05 * scale)
    with pytest.raises(ConfigError, match="model.dtype"):
        make(dtype="float64x")


# 7. remat and scan over layers ------------------------------------------------------------------

def _pure_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _stack_layers(loop_params: dict, num_layers: int) -> dict:
    """Loop layout {blocks: {0: {...}, 1: {...}}} -> scan layout {blocks: {...: (layers, ...)}}."""
    out = {k: v for k, v in loop_params.items() if k != "blocks"}
    layers = [loop_params["blocks"][i] for i in range(num_layers)]
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def _assert_trees_close(a, b, tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol,
                                   err_msg=jax.tree_util.keystr(path))


def _loss_and_grads(model, params, x):
    return jax.jit(jax.value_and_grad(_loss_fn(model)))(params, x)


def test_scan_matches_loop_logits_and_grads():
    layers = 3
    loop = make(seed=0, num_layers=layers)
    scan = make(seed=5, num_layers=layers, scan_layers=True)
    loop_params = _pure_params(loop)
    stacked = _stack_layers(loop_params, layers)
    # Same tree as the scan model's own params, only the values come from the loop model.
    assert jax.tree.structure(stacked) == jax.tree.structure(_pure_params(scan))
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, _pure_params(scan))
    # With the same seed the two layouts start from the same weights.
    _assert_trees_close(_pure_params(make(seed=0, num_layers=layers, scan_layers=True)), stacked,
                        0.0)

    x = tokens(batch=3, length=12)
    graphdef, abstract = nnx.split(scan)

    def scan_logits(params, t):
        state = jax.tree.map(lambda a: a, abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(t)

    np.testing.assert_allclose(np.asarray(jax.jit(scan_logits)(stacked, x)),
                               np.asarray(apply(loop, x)), rtol=1e-5, atol=1e-5)

    loss_loop, g_loop = _loss_and_grads(loop, loop_params, x)
    loss_scan, g_scan = _loss_and_grads(scan, stacked, x)
    np.testing.assert_allclose(float(loss_scan), float(loss_loop), rtol=1e-5, atol=1e-5)
    _assert_trees_close(g_scan, _stack_layers(g_loop, layers), 1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_remat_policies_match_no_remat(scan):
    x = tokens(batch=2, length=12)
    base = make(scan_layers=scan)
    params = _pure_params(base)
    loss0, grads0 = _loss_and_grads(base, params, x)
    for remat in ("full", "save_dots"):
        model = make(scan_layers=scan, remat=remat)
        _assert_trees_close(_pure_params(model), params, 0.0)  # remat does not change init
        loss, grads = _loss_and_grads(model, params, x)
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, atol=1e-6)
        _assert_trees_close(grads, grads0, 1e-6)


def test_remat_actually_recomputes():
    """The remat wrapper is in the traced program (a checkpoint / remat primitive per block)."""
    x = tokens()
    for scan in (False, True):
        for remat, expected in (("none", 0), ("full", 1)):
            model = make(scan_layers=scan, remat=remat)
            graphdef, state = nnx.split(model)
            jaxpr = str(jax.make_jaxpr(
                jax.grad(lambda st: jnp.mean(nnx.merge(graphdef, st)(x))))(state))
            assert ("remat" in jaxpr or "checkpoint" in jaxpr) == bool(expected), (scan, remat)


def test_stacked_params_carry_layers_axis():
    model = make(scan_layers=True, num_layers=3)
    leaves = param_leaves(model)
    assert "blocks/attn/q" in leaves and "blocks/mlp/down" in leaves
    assert not any(name.startswith("blocks/0") for name in leaves)
    q = leaves["blocks/attn/q"]
    assert q[...].shape == (3, 32, 4, 8)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    for name, var in leaves.items():
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim, name
        if name.startswith("blocks/"):
            assert axes[0] == "layers" and var[...].shape[0] == 3, (name, axes)
        else:
            assert "layers" not in axes, name
    # Only Params are kept (no RNG state from the vmapped init), before and after a forward pass
    # (nnx.scan strips and re-adds the "layers" axis in the metadata).
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(model, nnx.Param))
    apply(model, tokens())
    model(tokens())
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(model, nnx.Param))
    assert leaves["blocks/attn/q"].get_metadata()["out_sharding"][0] == "layers"
    # Every layer gets its own initial values.
    assert not np.allclose(np.asarray(q[0]), np.asarray(q[1]))
    specs = sharding.param_specs(nnx.eval_shape(lambda: make(scan_layers=True)), DEFAULT_RULES)
    # the stacked layers over `stage` (pipeline stages; size 1 unless mesh.stage is set)
    assert specs["blocks"]["attn"]["q"] == P("stage", "fsdp", "tensor", None)
    assert specs["blocks"]["mlp"]["down"] == P("stage", "tensor", "fsdp")


def test_scan_pure_dict_workflow_sharded_init_and_grad():
    cfg = dict(scan_layers=True, remat="full")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract = nnx.eval_shape(lambda: make(**cfg))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    specs = sharding.param_specs(abstract, DEFAULT_RULES)
    init = _init_fn(cfg)
    shardings = sharding.named_shardings(specs, jax.eval_shape(init), mesh)
    params = jax.jit(init, out_shardings=shardings)()
    assert params["blocks"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    _assert_trees_close(params, _pure_params(make(**cfg)), 1e-6)
    x = jax.device_put(tokens(batch=4, length=9), NamedSharding(mesh, P(("data", "fsdp"))))
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(abstract)))(params, x)
    assert np.isfinite(float(loss)) and abs(float(loss) - math.log(64)) < 1.0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_layer_layouts_convert_both_ways_one_weight_at_a_time():
    """Loop -> scan -> loop on a sharded mesh: exact values, the target's shardings, and the
    sources consumed (deleted) as they are converted (no second copy of the model)."""
    from infra.models.layers import convert_layers

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def placed(scan):
        cfg = dict(scan_layers=scan, num_layers=3)
        abstract = nnx.eval_shape(lambda: make(**cfg))
        specs = sharding.param_specs(abstract, DEFAULT_RULES)
        init = _init_fn(cfg)
        shardings = sharding.named_shardings(specs, jax.eval_shape(init), mesh)
        params = jax.jit(init, out_shardings=shardings)()
        return params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=x.sharding), params)

    loop, loop_abstract = placed(False)
    _, scan_abstract = placed(True)
    want = jax.tree.map(np.asarray, loop)
    sources = jax.tree.leaves(loop["blocks"])
    scanned = convert_layers(loop, 3, scan_abstract)
    assert all(x.is_deleted() for x in sources)
    q = scanned["blocks"]["attn"]["q"]
    assert q.sharding == scan_abstract["blocks"]["attn"]["q"].sharding and q.shape[0] == 3
    np.testing.assert_array_equal(np.asarray(q[1]), want["blocks"][1]["attn"]["q"])
    back = convert_layers(scanned, 3, loop_abstract)
    for got, expected, target in zip(jax.tree.leaves(back), jax.tree.leaves(want),
                                     jax.tree.leaves(loop_abstract)):
        np.testing.assert_array_equal(np.asarray(got), expected)
        assert got.sharding == target.sharding


@pytest.mark.parametrize("bad", ["selective", "", None, True])
def test_invalid_remat_raises_config_error(bad):
    with pytest.raises(ConfigError) as info:
        make(remat=bad)
    msg = str(info.value)
    assert "model.remat" in msg and "\n" not in msg
    assert all(choice in msg for choice in ("none", "full", "save_dots"))
    with pytest.raises(ConfigError, match="model.scan_layers"):
        make(scan_layers="yes")


# 8. activation sharding constraints ------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_activation_constraints_under_sequence_and_tensor_parallelism(scan):
    mesh = jax.make_mesh((2, 1, 2, 1, 2), ("data", "fsdp", "sequence", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 5)
    model = make(scan_layers=scan, remat="save_dots" if scan else "none")
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    specs = sharding.param_specs(model, DEFAULT_RULES)
    params = jax.device_put(params, sharding.named_shardings(specs, params, mesh))
    x = tokens(batch=4, length=12)
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, DEFAULT_RULES, ("batch", "length")))
    assert x_sharded.sharding.spec == P(("data", "fsdp", "expert"), "sequence")

    def forward(p, t):
        st = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(t)

    def constrained(p, t):
        with sharding.activation_rules(mesh, DEFAULT_RULES):
            return forward(p, t)

    plain_jaxpr = str(jax.make_jaxpr(forward)(params, x_sharded))
    assert "sharding_constraint" not in plain_jaxpr
    jaxpr = str(jax.make_jaxpr(constrained)(params, x_sharded))
    # embedding + per-block residual, q, k, v, mlp hidden (once in scan) + logits
    assert jaxpr.count("sharding_constraint") >= 7
    lowered = jax.jit(constrained).lower(params, x_sharded).as_text()
    assert "sharding" in lowered.lower()

    expected = apply(model, x)  # unsharded, no constraints
    out = jax.jit(constrained)(params, x_sharded)
    assert out.sharding.is_equivalent_to(
        NamedSharding(mesh, P(("data", "fsdp", "expert"), "sequence", "tensor")), out.ndim)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # Causality with `length` split over `sequence`: a change at position t leaves positions < t
    # alone, also for t in the second sequence shard.
    t = 8
    x2 = x.at[:, t].set((x[:, t] + 1) % 64)
    out2 = jax.jit(constrained)(params, jax.device_put(x2, x_sharded.sharding))
    np.testing.assert_allclose(np.asarray(out2[:, :t]), np.asarray(out[:, :t]),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(out2[:, t:]), np.asarray(out[:, t:]))


# 6. the typed config's FLOPs formula ----------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"model.tie_embeddings": False},
                                       {"model.num_layers": 3, "data.seq_len": 128,
                                        "model.max_seq_len": 128}])
def test_flops_per_token_matches_xla_cost_analysis(overrides):
    """`TransformerConfig.flops_per_token` (what `plan` uses) against XLA's count of the
    compiled train step: XLA also counts the elementwise work (norms, softmax, the optimizer),
    so the matmul formula is a little below it."""
    from infra import config, train, utilization
    from infra import mesh as mesh_lib
    from infra.models import hyper_params

    cfg = config.load("experiments/lm.py:smoke", {
        "model.causal_blocks": 1, "mesh.data": 1, "sharding.print_table": False, **overrides})
    trainer = train.build(cfg, mesh=mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    state = trainer.state.init(jax.random.key(0))
    batch = trainer.to_global(next(trainer.task.train_iterator(0, 1)))
    xla = utilization.compiled_flops(trainer.train_step.lower(state, batch).compile())
    tokens = cfg.train.batch_size * cfg.data.seq_len
    analytic = hyper_params(cfg.model).flops_per_token(cfg.data.seq_len) * tokens
    assert 0.9 < analytic / xla <= 1.0, (analytic, xla)
