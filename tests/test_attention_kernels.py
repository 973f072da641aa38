"""Attention backends (`model.attention`): the Pallas splash kernel (interpreted on CPU) and the
`jax.nn.dot_product_attention` call behind cudnn (run with XLA here) equal our attention in
values and gradients: causal, packed segments, grouped-query heads, alone and sharded over the
mesh; asking for a kernel the devices lack is one config error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infra import config as config_lib
from infra import sharding
from infra.errors import ConfigError
from infra.mesh import make_mesh
from infra.models import attention_kernels as kernels
from infra.models.attention import Mask, attend, uncounted_flops_per_token

B, T, HEADS, KV, HD = 2, 128, 4, 2, 32


def _inputs(seed=0):
    r = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(r[0], (B, T, HEADS, HD), jnp.float32)
    k = jax.random.normal(r[1], (B, T, KV, HD), jnp.float32)
    v = jax.random.normal(r[2], (B, T, KV, HD), jnp.float32)
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 0]], T // 4, axis=1), jnp.int32)
    return q, k, v, segments


def _reference(q, k, v, mask):
    return attend(q, k, v, mask, dtype=jnp.float32, query_blocks=[(0, T // 2), (T // 2, T)])


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("backend", ["splash", "cudnn"])
def test_kernel_equals_xla_attention_in_values_and_gradients(backend, packed):
    q, k, v, segments = _inputs()
    mask = Mask(causal=True, positions=jnp.arange(T), segment_ids=segments if packed else None)
    if backend == "splash":
        fused = lambda q, k, v: attend(q, k, v, mask, dtype=jnp.float32,  # noqa: E731
                                       backend="splash", interpret=True)
    else:  # the cudnn call's arguments, run by XLA on this CPU
        def fused(q, k, v):
            scaled = q * (1.0 / np.sqrt(HD))
            return kernels.cudnn(scaled, k, v, causal=True, segment_ids=mask.segment_ids,
                                 implementation=None)
    cotangent = jax.random.normal(jax.random.key(9), (B, T, HEADS, HD))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)

    np.testing.assert_allclose(fused(q, k, v), _reference(q, k, v, mask), atol=1e-5)
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda a, b, c: _reference(a, b, c, mask)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_splash_sharded_over_batch_and_heads_equals_xla():
    """data=2 x tensor=2 (4 of the 8 CPU devices): the kernel runs per shard in shard_map."""
    mesh = make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    rules = sharding.normalize_rules(config_lib.load("experiments/lm.py:smoke").sharding.rules,
                                     mesh)
    q, k, v, segments = _inputs(1)
    mask = Mask(causal=True, positions=jnp.arange(T), segment_ids=segments)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    q, k, v = place(q, P("data", None, "tensor")), place(k, P("data", None, "tensor")), \
        place(v, P("data", None, "tensor"))

    @jax.jit
    def fused(q, k, v, segments):
        with sharding.activation_rules(mesh, rules):
            return attend(q, k, v, Mask(causal=True, positions=jnp.arange(T),
                                        segment_ids=segments),
                          dtype=jnp.float32, backend="splash", interpret=True)

    np.testing.assert_allclose(fused(q, k, v, segments), _reference(q, k, v, mask), atol=1e-5)


def test_asking_for_a_kernel_the_devices_lack_is_one_config_error(tmp_path):
    assert kernels.resolve("auto", "cpu") == "xla"
    assert kernels.resolve("auto", "tpu") == "splash"
    assert kernels.resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert kernels.resolve("auto", "gpu", jnp.float32) == "xla"
    with pytest.raises(ConfigError, match="cudnn needs a 16-bit compute dtype, not float32; "
                                          "set model.dtype=bfloat16"):
        kernels.resolve("cudnn", "gpu", jnp.float32)
    with pytest.raises(ConfigError, match="model.attention=splash needs TPU devices but this "
                                          "run's are cpu; set model.attention=auto"):
        kernels.resolve("splash", "cpu")
    with pytest.raises(ConfigError, match="model.attention=cudnn needs GPU devices"):
        kernels.resolve("cudnn", "tpu")
    with pytest.raises(ConfigError, match="model.attention must be one of xla, splash"):
        config_lib.load("experiments/lm.py:smoke", {"model.attention": "flash"})
    from infra import train

    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="needs GPU devices") as e:
        train.run(config_lib.load("experiments/lm.py:smoke", {"model.attention": "cudnn"}),
                  workdir)
    assert e.value.exit_code == 2 and (not workdir.exists() or not any(workdir.iterdir()))


def test_a_kernels_flops_are_counted_as_xla_counts_its_own_attention():
    """XLA's cost analysis cannot see inside a kernel's custom call: the MFU meter adds
    `uncounted_flops_per_token`, which must equal what XLA counts for `xla` attention (4 causal
    query blocks, every layer and row), forward and backward; nothing when XLA's own runs."""
    from infra import utilization
    from infra.models import hyper_params

    q, k, v, _ = _inputs()
    mask = Mask(causal=True, positions=jnp.arange(T))
    blocks = [(i * T // 4, (i + 1) * T // 4) for i in range(4)]
    incoming = jax.random.normal(jax.random.key(3), q.shape)  # a real incoming gradient

    def loss(q, k, v):
        return (attend(q, k, v, mask, dtype=jnp.float32, query_blocks=blocks) * incoming).sum()

    counted = utilization.compiled_flops(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v).compile())
    model = hyper_params(config_lib.load("experiments/lm.py:smoke", {
        "model.num_layers": 3, "model.num_heads": HEADS, "model.num_kv_heads": KV,
        "model.head_dim": HD, "model.causal_blocks": 4, "model.max_seq_len": T}).model)
    added = uncounted_flops_per_token(model, T, "tpu") * B * T
    print(f"\nXLA counts {counted:.3e} FLOPs for one layer's xla attention; a kernel's, in 3 "
          f"layers, are counted as {added:.3e}")
    assert added == pytest.approx(3 * counted, rel=1e-3)
    assert uncounted_flops_per_token(model, T, "cpu") == 0.0
