"""DLRM click-through workload: data, metrics, row-sharded embedding tables, meshes, resume, CLI."""

import json
import logging
import re
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from infra import config, sharding, train
from infra.data import clicks
from infra.tasks.ctr import ClickThroughTask, log_loss, roc_auc
from tests.helpers import assert_metric_everywhere, cli

SMOKE = "experiments/dlrm.py:smoke"
QUIET = {"train.progress_bar": False, "sharding.print_table": False}
MESH_2x2x2 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def trainer_for(**overrides) -> train.Trainer:
    return train.build(config.load(SMOKE, {**QUIET, **overrides}))


def train_losses(trainer: train.Trainer, state, steps: int) -> list[float]:
    """Losses of `steps` train steps from `state` (stepping the Trainer directly)."""
    batches = trainer.task.train_iterator(0, 1)
    losses = []
    for _ in range(steps):
        batch = sharding.to_global(next(batches), trainer.batch_shardings)
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


# --------------------------------------------------------------------------- data


def test_generator_is_deterministic_from_its_seed():
    spec = clicks.ClickSpec(num_train=5000, num_eval=1000, max_vocab=300)
    a, b = clicks.generate(spec), clicks._split(clicks.make_ground_truth(spec), 5000,
                                                np.random.default_rng([0, 1]))
    for key in ("dense", "ids", "label", "prob"):
        np.testing.assert_array_equal(a.train[key], b[key])
    other = clicks.generate(clicks.ClickSpec(seed=1, num_train=5000, num_eval=1000, max_vocab=300))
    assert not np.array_equal(a.train["ids"], other.train["ids"])
    # the held-out set does not depend on the training-set size
    bigger = clicks.generate(clicks.ClickSpec(num_train=6000, num_eval=1000, max_vocab=300))
    np.testing.assert_array_equal(a.eval["ids"], bigger.eval["ids"])


def test_ids_follow_a_power_law_and_truth_has_the_documented_shape():
    log = clicks.generate(clicks.ClickSpec(num_train=1000))  # default truth; 200k held out
    e = log.eval
    assert e["dense"].shape == (200_000, 13) and e["ids"].shape == (200_000, 26)
    assert np.all(e["ids"] < np.array(log.spec.vocab_sizes)) and np.all(e["ids"] >= 0)
    big = log.spec.vocab_sizes.index(5000)
    counts = np.sort(np.bincount(e["ids"][:, big], minlength=5000))[::-1]
    assert counts[0] > 100 * np.median(counts)  # head much more frequent than the median id
    ranks = np.arange(1, 101)  # log-count falls linearly in log-rank with slope ≈ -zipf
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.4 < slope < -1.0, slope
    assert 0.2 < e["label"].mean() < 0.3
    assert 0.75 < roc_auc(e["label"], e["prob"]) < 0.85


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(4))
def test_auc_and_log_loss_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) * 0.5 + 0.4 * labels, 1)  # few distinct values: many ties
    assert len(np.unique(scores)) < 20
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    probs = np.clip(rng.random(300), 0.01, 0.99)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), abs=1e-12)
    assert np.isnan(roc_auc(np.zeros(5), np.arange(5)))  # one class: undefined


def test_summary_covers_every_held_out_example_once():
    task = ClickThroughTask(config.load(SMOKE, {"data.num_eval": 2000}))
    batches = task.eval_batches(0, 1)
    assert sum(b["mask"].sum() for b in batches) == 2000  # the padded last batch is masked
    rng = np.random.default_rng(0)
    outputs = [{"prob": rng.random(len(b["label"])), "label": b["label"], "mask": b["mask"]}
               for b in batches]
    summary = task.summarize_eval(outputs)
    keep = np.concatenate([o["mask"] for o in outputs]) > 0
    probs = np.concatenate([o["prob"] for o in outputs])[keep]
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in outputs])[keep],
                                  task.log.eval["label"])
    assert summary["auc"] == pytest.approx(roc_auc_score(task.log.eval["label"], probs))
    assert summary["bayes_auc"] == pytest.approx(
        roc_auc_score(task.log.eval["label"], task.log.eval["prob"]))
    assert summary["auc_gap"] == pytest.approx(summary["bayes_auc"] - summary["auc"])


# --------------------------------------------------------------------------- sharding


def test_embedding_table_is_sharded_row_wise_and_lookups_are_exact():
    trainer = train.build(config.load(SMOKE, {**QUIET, **MESH_2x2x2}))
    state = trainer.state.init(jax.random.key(0))
    params = flat(state["params"])
    table = params["table"]
    assert table.sharding.spec == P(("data", "fsdp", "tensor"), None)
    assert table.shape[0] % 64 == 0 and table.shape[0] >= sum(trainer.task.spec.vocab_sizes)
    shards = table.addressable_shards
    assert len(shards) == 8
    assert {s.data.shape for s in shards} == {(table.shape[0] // 8, table.shape[1])}
    assert len({s.index[0].start for s in shards}) == 8  # 8 distinct row blocks
    for moments in (state["opt_state"][1][0].mu, state["opt_state"][1][0].nu):
        assert flat(moments)["table"].sharding.spec == table.sharding.spec

    # A lookup on the sharded table (ids split over the batch axes) equals a numpy gather.
    batch = sharding.to_global(trainer.task.eval_batches(0, 1)[0], trainer.batch_shardings)
    merge = trainer.state.model.merge
    embed = jax.jit(lambda p, ids: merge(p).embed(ids))
    got = embed(state["params"], batch["ids"])
    # XLA partitions the lookup without ever gathering the table: ids are all-gathered, each
    # device looks up its own rows and the (batch, features, dim) result is all-reduced.
    hlo = embed.lower(state["params"], batch["ids"]).compile().as_text()
    collectives = [line for line in hlo.splitlines()
                   if re.search(r" (all-gather|all-reduce|all-to-all)(-start)?\(", line)]
    assert collectives and not any(f"[{table.shape[0]}," in line for line in collectives)
    offsets = np.cumsum([0, *trainer.task.spec.vocab_sizes[:-1]])
    want = np.asarray(table)[np.asarray(batch["ids"]) + offsets]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.fixture(scope="module")
def data8():
    """(initial state on the host, 10 losses) of the smoke variant on data=8, seed 0."""
    trainer = trainer_for(**{"mesh.data": 8})
    state = trainer.state.init(jax.random.key(0))
    host = jax.tree.map(np.array, jax.device_get(state))  # a copy: the steps donate `state`
    return host, train_losses(trainer, state, 10)


@pytest.mark.slow
def test_loss_is_the_same_on_data8_and_2x2x2(data8):
    _, ref = data8
    trainer = trainer_for(**MESH_2x2x2)
    losses = train_losses(trainer, trainer.state.init(jax.random.key(0)), 10)  # same seed
    print("max loss difference", np.max(np.abs(np.subtract(losses, ref))))
    np.testing.assert_allclose(losses, ref, atol=1e-4, rtol=0)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_smoke_runs_on_every_mesh_preset(data8):
    host, ref = data8  # one initial state, laid out for each mesh (skips 9 init compiles)
    for preset in config.PRESETS:
        trainer = trainer_for(**{"sharding.preset": preset})
        losses = train_losses(trainer, jax.device_put(host, trainer.state.shardings), 3)
        np.testing.assert_allclose(losses, ref[:3], atol=1e-4, rtol=0, err_msg=preset)


# --------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, caplog):
    cfg = config.load(SMOKE, {**QUIET, "train.steps": 20, "train.log_every": 1,
                              "train.eval_every": 100, "train.eval_at_start": False,
                              "checkpoint.every": 10})

    def losses(history):
        return {r["step"]: r["train/loss"] for r in history if "train/loss" in r}

    _, straight = train.run(cfg, tmp_path / "straight")
    # A run stopped after its step-10 checkpoint: the straight run's workdir without step 20.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "20")
    with caplog.at_level(logging.INFO, logger="infra.train"):
        _, resumed = train.run(cfg, tmp_path / "resumed")
    assert "resumed from step 10" in caplog.text
    assert len(losses(straight)) == 20
    assert losses(resumed) == losses(straight)


@pytest.mark.slow
def test_smoke_trains_through_cli_and_logs_auc(tmp_path):
    p = cli("train", "--config", SMOKE, "--workdir", str(tmp_path),
            "--config.sharding.print_table=false")
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/auc" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    last = evals[-1]
    assert 0.55 < last["eval/auc"] < last["eval/bayes_auc"] <= 1
    assert last["eval/logloss"] < evals[0]["eval/logloss"]
    assert {"eval/bayes_logloss", "eval/auc_gap", "train/examples_per_sec"} <= (
        set(last) | {k for r in records for k in r})
    assert "eval auc" in p.stdout and "eval logloss" in p.stdout
    assert_metric_everywhere(tmp_path, p.stderr, "auc")
