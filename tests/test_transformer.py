"""Tests of the decoder-only transformer and the model registry (CPU, 8 emulated devices)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

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


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_reference(num_kv_heads):
    model = make(num_kv_heads=num_kv_heads)
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
