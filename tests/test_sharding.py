"""Live arrays carry the shardings the logical-axis rules say; several meshes train."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infra import config, sharding, train

MESH_2x2x2 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def build(**overrides):
    return train.build(config.load("experiments/lm.py:smoke", overrides))


def test_param_shardings_follow_rules_on_2x2x2():
    trainer = build(**MESH_2x2x2)
    state = trainer.state.init(jax.random.key(0))
    rules = dict(config.DEFAULT_RULES)
    expected = {
        "embedding": P(rules["vocab"], rules["embed"]),
        "blocks/0/attn/q": P("fsdp", "tensor", None),
        "blocks/0/attn/k": P("fsdp", "tensor", None),
        "blocks/0/attn/o": P("tensor", None, "fsdp"),
        "blocks/0/mlp/gate": P("fsdp", "tensor"),
        "blocks/0/mlp/down": P("tensor", "fsdp"),
        "blocks/1/mlp_norm/scale": P(None),
    }
    flat = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    }
    for name, spec in expected.items():
        live = flat[name].sharding
        assert live.spec == spec, (name, live.spec, spec)
        assert dict(live.mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "sequence": 1,
                                         "expert": 1, "tensor": 2}
    # a 2-way split really halves the per-device shard
    q = flat["blocks/0/attn/q"]
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])

    # Adam moments are sharded exactly like their parameters
    adam = state["opt_state"][1][0]
    for moments in (adam.mu, adam.nu):
        for (path, leaf), param in zip(jax.tree_util.tree_flatten_with_path(moments)[0],
                                       jax.tree.leaves(state["params"])):
            assert leaf.sharding == param.sharding, path


def test_batch_is_split_over_data_and_fsdp():
    trainer = build(**MESH_2x2x2)
    local = trainer.task.eval_batches(0, 1)[0]
    batch = sharding.to_global(local, trainer.batch_shardings)
    assert batch["inputs"].sharding.spec == P(("data", "stage", "fsdp", "expert"), "sequence")
    assert len({str(s.index) for s in batch["inputs"].addressable_shards}) == 4
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])


def test_rules_that_do_not_divide_fall_back_to_replicated():
    spec = sharding.fit_spec(P("tensor", None), (3, 8), build(**MESH_2x2x2).mesh)
    assert spec == P(None, None)


def test_large_replicated_params_are_reported():
    trainer = build(**{"sharding.rules": (("batch", "data"),)})  # every weight replicated
    table = sharding.sharding_table(
        trainer.state.abstract["params"], trainer.state.shardings["params"], warn_replicated_mb=0.01
    )
    assert "warning: embedding" in table and "replicated on every device" in table


def test_rules_naming_unknown_mesh_axis_are_rejected():
    with pytest.raises(Exception, match="mesh axis 'model'"):
        build(**{"sharding.rules": (("embed", "model"),)})


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"mesh.data": 8}, {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}])
def test_meshes_train(tmp_path, mesh):
    cfg = config.load("experiments/lm.py:smoke", {
        **mesh, "train.steps": 10, "train.eval_every": 10, "train.progress_bar": False,
        "sharding.print_table": False,
    })
    state, history = train.run(cfg, tmp_path)
    evals = [r["eval/loss"] for r in history if "eval/loss" in r]
    assert int(state["step"]) == 10
    assert evals[-1] < evals[0]
