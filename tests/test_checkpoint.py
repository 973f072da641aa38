"""The checkpoint package on its own: the read-only parameter loader and checkpoints written by
earlier versions of the stack (tests/fixtures/v0_lm_workdir, written at commit 83d6df8)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infra.checkpoint import Checkpointer, committed_steps, restore_params
from infra.errors import CheckpointError, UserError
from tests.helpers import ROOT, Position

FIXTURE = ROOT / "tests" / "fixtures" / "v0_lm_workdir"


def tree_files(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def assert_equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def old_workdir(tmp_path):
    workdir = tmp_path / "v0"
    shutil.copytree(FIXTURE, workdir)
    return workdir


def test_a_checkpoint_of_the_old_layout_restores(old_workdir):
    from infra import config as config_lib
    from infra import train

    config = config_lib.load_saved(old_workdir)
    assert "causal_blocks" not in json.loads((old_workdir / "config.json").read_text())["model"]
    assert config.model.causal_blocks == 4  # a key added since takes its default
    with config.unlocked():
        config.train.batch_size = 8  # written on 1 device; restored here onto 8
    trainer = train.build(config)
    saved = ocp.StandardCheckpointer().restore(old_workdir / "checkpoints" / "2" / "state")

    params, step = restore_params(old_workdir, trainer.state.abstract["params"])
    assert step == 2
    assert_equal_trees(params, saved["params"])

    ckpt = Checkpointer(old_workdir, every=2, keep=3)
    state, meta, iterator = ckpt.restore_latest(
        trainer.state.abstract, lambda s: trainer.task.train_iterator(0, 1, start_step=s))
    ckpt.close()
    assert meta["step"] == 2 and int(state["step"]) == 2
    assert_equal_trees(state, saved)
    assert iterator.get_state()["next_index"] == 2


def _save_steps(workdir, steps):
    """A tiny 'train state' saved at `steps`, sharded over the 8 devices."""
    mesh = jax.make_mesh((8,), ("data",))
    rows = NamedSharding(mesh, P("data"))
    ckpt = Checkpointer(workdir, every=1, keep=10)
    states = {}
    for step in steps:
        state = {"params": {"w": jax.device_put(jnp.full((16, 4), float(step)), rows),
                            "b": jax.device_put(jnp.arange(4.0) + step, NamedSharding(mesh, P()))},
                 "opt_state": {"mu": jax.device_put(jnp.zeros((16, 4)), rows)},
                 "step": jnp.int32(step)}
        states[step] = jax.device_get(state)
        ckpt.save(step, state, Position(step), {})
    ckpt.wait()
    ckpt.close()
    abstract = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=rows),
                "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    return states, abstract


def _flip_bytes(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))


def test_restore_params_is_read_only_and_skips_a_damaged_step(tmp_path, caplog):
    states, abstract = _save_steps(tmp_path, (1, 2, 3))
    params, step = restore_params(tmp_path, abstract)
    assert step == 3 and params["w"].sharding == abstract["w"].sharding
    assert_equal_trees(params, states[3]["params"])
    params, step = restore_params(tmp_path, abstract, step=2)
    assert step == 2
    assert_equal_trees(params, states[2]["params"])

    _flip_bytes(tmp_path / "checkpoints" / "3")
    before = tree_files(tmp_path)
    with caplog.at_level("WARNING"):
        params, step = restore_params(tmp_path, abstract)
    assert step == 2 and "step 3" in caplog.text and "corrupted" in caplog.text
    assert tree_files(tmp_path) == before  # nothing moved, deleted or written
    assert committed_steps(tmp_path) == [1, 2, 3]
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        restore_params(tmp_path, abstract, step=3)


def test_restore_params_refuses_other_models_and_missing_steps(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        restore_params(tmp_path, {})
    _, abstract = _save_steps(tmp_path, (1,))
    with pytest.raises(UserError, match="no checkpoint of step 5.*committed steps: 1"):
        restore_params(tmp_path, abstract, step=5)
    wider = {**abstract, "w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=abstract["w"].sharding)}
    with pytest.raises(UserError, match=r"'params/w' is float32\[16, 4\] there but float32\[16, 8\] here"):
        restore_params(tmp_path, wider)
    fewer = {"w": abstract["w"]}  # e.g. a config.json edited to fewer layers
    with pytest.raises(UserError, match="holds parameter 'params/b'"):
        restore_params(tmp_path, fewer)


def test_a_commit_is_recorded_when_it_commits_not_at_the_next_save(tmp_path):
    """Goodput's timeline: the `checkpoint_committed` event comes from the loop's per-step poll
    while a save commits in the background, not from the next save minutes later."""
    import time

    from infra.events import EventLog, read_events

    mesh = jax.make_mesh((8,), ("data",))
    state = {"w": jax.device_put(jnp.ones((64, 8)), NamedSharding(mesh, P("data"))),
             "step": jnp.int32(1)}
    events = EventLog(tmp_path)
    ckpt = Checkpointer(tmp_path, every=1, keep=2, events=events)
    ckpt.COMMIT_POLL_S = 0.05
    ckpt.save(1, state, Position(1), {})
    seen = lambda: [e for e in read_events(tmp_path) if e["event"] == "checkpoint_committed"]  # noqa: E731
    deadline = time.monotonic() + 60
    while not seen() and time.monotonic() < deadline:
        ckpt.poll_commits()  # what the loop calls every step
        time.sleep(0.02)
    (event,) = seen()
    marker_time = max(f.stat().st_mtime for f in (tmp_path / "checkpoints" / "1").rglob("*"))
    assert event["step"] == 1 and event["time"] - marker_time < 1.0, (event, marker_time)
    ckpt.close()
    events.close()
