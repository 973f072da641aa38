"""Changing the mesh changes only speed and memory, never the math."""

import jax
import numpy as np
import pytest

from infra import config, train

MESHES = {
    "data=8": {"mesh.data": 8},
    "fsdp=8": {"mesh.data": 1, "mesh.fsdp": 8},
    "data=2,fsdp=2,tensor=2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    "fsdp=4,tensor=2": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2},
    "data=4,sequence=2": {"mesh.data": 4, "mesh.sequence": 2},
}
BASE = {"train.steps": 20, "train.log_every": 1, "train.eval_every": 20, "train.progress_bar": False,
        "sharding.print_table": False, "checkpoint.every": 1000}


def train_smoke(tmp_path, name, **overrides):
    cfg = config.load("experiments/lm.py:smoke", {**BASE, **overrides})
    state, history = train.run(cfg, tmp_path / name)
    losses = np.array([r["train/loss"] for r in history if "train/loss" in r])
    return jax.device_get(state["params"]), losses


def max_rel_diff(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_smoke(tmp_path_factory.mktemp("ref"), "data8", **MESHES["data=8"])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [m for m in MESHES if m != "data=8"])
def test_every_mesh_gives_the_same_training(tmp_path, reference, mesh):
    ref_params, ref_losses = reference
    params, losses = train_smoke(tmp_path, mesh, **MESHES[mesh])
    assert len(losses) == len(ref_losses) == 20
    diff = max_rel_diff(losses, ref_losses)
    print(f"{mesh}: max relative loss difference {diff:.2e}")
    assert diff <= 1e-4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    _, big = train_smoke(tmp_path, "big", **{"train.batch_size": 32})
    params_acc, acc = train_smoke(tmp_path, "acc", **{"train.batch_size": 32, "train.microbatches": 4})
    print(f"accumulation: max relative loss difference {max_rel_diff(acc, big):.2e}")
    assert max_rel_diff(acc, big) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("switch", [{"model.remat": "full"}, {"model.remat": "save_dots"},
                                    {"model.scan_layers": True},
                                    {"model.scan_layers": True, "model.remat": "full",
                                     "model.loss_blocks": 4}])
def test_remat_and_scan_change_nothing_but_memory(tmp_path, reference, switch):
    _, ref_losses = reference
    _, losses = train_smoke(tmp_path, "switch", **MESHES["data=8"], **switch)
    print(f"{switch}: max relative loss difference {max_rel_diff(losses, ref_losses):.2e}")
    assert max_rel_diff(losses, ref_losses) <= 1e-4


@pytest.mark.slow
def test_fsdp_shards_every_large_leaf_of_params_and_optimizer_state():
    trainer = train.build(config.load("experiments/lm.py:smoke", {"sharding.preset": "fsdp"}))
    assert dict(trainer.mesh.shape)["fsdp"] == 8
    state = trainer.state.init(jax.random.key(0))
    for tree in (state["params"], state["opt_state"]):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if leaf.size >= 4096:
                assert "fsdp" in str(leaf.sharding.spec), (jax.tree_util.keystr(path), leaf.sharding.spec)
                assert leaf.addressable_shards[0].data.size == leaf.size // 8


def test_presets_set_mesh_sizes_and_explicit_sizes_win():
    c = config.load("experiments/lm.py:smoke", {"sharding.preset": "fsdp_tp"})
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 2)
    c = config.load("experiments/lm.py:smoke", {"sharding.preset": "fsdp_tp", "mesh.tensor": 4})
    assert c.mesh.tensor == 4
    with pytest.raises(config.ConfigError, match="unknown sharding.preset 'zero3'; known presets: dp, fsdp"):
        config.load("experiments/lm.py:smoke", {"sharding.preset": "zero3"})
