"""Post-training: GRPO's advantages and objective against hand-written references, its gradient
against the policy-gradient formula, DPO's loss against its formula, the rollout engine's
log-probabilities and weight sync against the trainer, and GRPO / DPO through the CLI (a smoke
run, SIGKILL and resume identical to a straight run)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infra import config, train
from infra.data import arithmetic
from infra.errors import ConfigError, UserError
from infra.rl import losses, rewards
from infra.rl.reference import token_logprobs
from infra.rl.sequences import completion_rows
from infra.tasks import get_task
from tests.helpers import cli

GRPO = "experiments/grpo.py:smoke"


# --------------------------------------------------------------------------- objectives


def test_group_advantages_match_a_hand_computation():
    rewards_ = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    got = losses.group_advantages(rewards_, 4)
    for g in range(3):
        r = rewards_[4 * g:4 * g + 4]
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
        want = [(x - mean) / (std + losses.STD_EPS) for x in r]
        np.testing.assert_allclose(got[4 * g:4 * g + 4], want, rtol=1e-6)
    assert np.all(got[4:8] == 0)  # equal rewards: no signal
    np.testing.assert_allclose(losses.group_advantages(rewards_, 4, scale=False),
                               rewards_ - np.repeat(rewards_.reshape(3, 4).mean(1), 4), rtol=1e-6)


@pytest.mark.parametrize("averaging", ["token", "sequence"])
def test_grpo_objective_and_kl_match_a_hand_written_reference(averaging):
    r = np.random.default_rng(0)
    rows, length, eps, beta = 4, 6, 0.2, 0.05
    logp = -r.random((rows, length)) * 3
    old = logp + r.normal(0, 0.3, (rows, length))  # ratios inside and outside the clip range
    ref = logp + r.normal(0, 0.5, (rows, length))
    adv = np.array([1.5, -0.7, 0.3, -2.0])
    mask = np.zeros((rows, length))
    for i, n in enumerate([6, 3, 1, 4]):
        mask[i, length - n:] = 1
    loss, metrics = losses.grpo_objective(*map(jnp.asarray, (logp, old, ref, adv, mask)),
                                          epsilon=eps, beta=beta, averaging=averaging)
    per_row, tokens, kls, clipped = [], [], [], []
    for i in range(rows):
        row = []
        for t in range(length):
            if not mask[i, t]:
                continue
            ratio = math.exp(logp[i, t] - old[i, t])
            a = adv[i]
            kl = math.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            row.append(-min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a) + beta * kl)
            kls.append(kl)
            clipped.append((ratio < 1 - eps and a < 0) or (ratio > 1 + eps and a > 0))
        tokens += row
        per_row.append(sum(row) / len(row))
    want = sum(tokens) / len(tokens) if averaging == "token" else sum(per_row) / rows
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert float(metrics["clip_fraction"]) == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < sum(clipped) < len(clipped)


def test_dpo_loss_equals_its_formula_and_equal_pairs_have_zero_gradient():
    pc, pr, rc, rr = (jnp.asarray(v) for v in ([-3.0, -10.0], [-5.0, -2.0], [-4.0, -9.0],
                                                [-4.5, -2.5]))
    loss, m = losses.dpo_objective(pc, pr, rc, rr, beta=0.1)
    margins = [0.1 * ((-3 + 4) - (-5 + 4.5)), 0.1 * ((-10 + 9) - (-2 + 2.5))]
    want = sum(-math.log(1 / (1 + math.exp(-x))) for x in margins) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["reward_accuracy"]) == 0.5

    # chosen = rejected through a real model: the loss is log 2 and the gradient 0 (to rounding:
    # the two rows' equal and opposite terms meet inside the backward's sums)
    task = get_task(config.load("experiments/grpo.py:dpo-smoke"))
    with nnx.use_eager_sharding(False):
        model = task.build_model(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rows = completion_rows([np.array([5, 6, 7])] * 2, [np.array([8, 9, 10])] * 2, 16, 0)
    batch = {k: np.stack([v[0], v[1]])[None] for k, v in rows.items()}
    batch["ref_logprobs"] = np.full(batch["loss_mask"].shape, -1.0, np.float32)
    batch["mask"] = np.ones(1, np.float32)
    loss_of = jax.jit(jax.value_and_grad(
        lambda p, b: task.loss_fn(nnx.merge(graphdef, p), b, jax.random.key(0))[0]))
    value, grads = loss_of(params, batch)
    assert float(value) == pytest.approx(math.log(2), rel=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-8
    unequal = {**batch, "inputs": batch["inputs"].copy(), "targets": batch["targets"].copy()}
    unequal["targets"][0, 1, 4] = 11  # a different rejected completion: a real gradient
    _, grads = loss_of(params, unequal)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4


def test_grpo_gradient_with_one_iteration_and_no_kl_is_the_policy_gradient():
    """beta = 0, num_iterations = 1: grad loss = -sum_i A_i sum_t grad log p_t / tokens."""
    task = get_task(config.load(GRPO, {}))
    with nnx.use_eager_sharding(False):
        model = task.build_model(nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    r = np.random.default_rng(0)
    prompts = [r.integers(0, 259, 4) for _ in range(4)]
    completions = [r.integers(0, 259, n) for n in (6, 2, 5, 1)]
    batch = completion_rows(prompts, completions, task.seq_len, 0)
    adv = np.array([1.0, -0.5, 0.25, -0.75], np.float32)
    zeros = np.zeros_like(batch["loss_mask"])
    batch.update(advantages=adv, old_logprobs=zeros, ref_logprobs=zeros)

    def ours(p):
        return task.loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0))[0]

    def policy_gradient(p):
        logp = token_logprobs(nnx.merge(graphdef, p), batch)
        mask = batch["loss_mask"]
        return -jnp.sum(adv[:, None] * logp * mask) / jnp.sum(mask)

    got, want = jax.jit(jax.grad(ours))(params), jax.jit(jax.grad(policy_gradient))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(got)) > 0


# --------------------------------------------------------------------------- rewards


def test_reward_functions_resolve_combine_and_refuse_bad_output():
    fns = rewards.resolve("exact_answer, digits_only:0.5", "experiments/grpo.py:smoke")
    total, means = rewards.score(fns, ["1+2=", "3+4="], ["3", "x"], {"answer": ["3", "7"]})
    np.testing.assert_allclose(total, [1.5, 0.0])
    assert means == {"reward/exact_answer": 0.5, "reward/digits_only": 0.5}
    dotted = rewards.resolve("infra.data.arithmetic.exact_answer", "")
    assert dotted[0].fn is arithmetic.exact_answer
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        rewards.resolve("nope", "experiments/grpo.py:smoke")
    with pytest.raises(ConfigError, match=r"not name\[:weight\]"):
        rewards.resolve("exact_answer:heavy", "experiments/grpo.py:smoke")
    bad = [rewards.Reward("short", lambda p, c, **_: [1.0], 1.0)]
    with pytest.raises(UserError, match="'short' returned .*one finite number per completion"):
        rewards.score(bad, ["a", "b"], ["x", "y"], {})
    missing = [rewards.Reward("needs_label", lambda p, c, label, **_: [1.0] * len(c), 1.0)]
    with pytest.raises(UserError, match="'needs_label' raised TypeError.*fields: answer"):
        rewards.score(missing, ["a"], ["x"], {"answer": ["1"]})


# --------------------------------------------------------------------------- engine vs trainer


def test_engine_logprobs_equal_the_trainers_and_synced_weights_are_bit_identical():
    """A trainer with stacked layers on fsdp=2 x tensor=2 x data=2; its parameters synced into
    the rollout engine equal the trainer's exactly (unstacked, resharded); the engine's
    sampled tokens' log-probabilities equal the trainer's recomputation (float32)."""
    cfg = config.load(GRPO, {"model.scan_layers": True, "mesh.data": 2, "mesh.fsdp": 2,
                             "mesh.tensor": 2})
    trainer = train.build(cfg)
    state = trainer.state.init(jax.random.key(3))
    task = trainer.task
    records, ids = task.prompts["train"]
    records, ids = records[:4], ids[:4]
    out = task.rollout(trainer, state["params"], records, ids, np.arange(4))
    engine = task.engine(trainer).engine
    blocks = state["params"]["blocks"]
    for i in range(cfg.model.num_layers):
        mine = jax.tree.map(lambda x: x[i], blocks)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(engine.params["blocks"][i])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("embedding", "final_norm"):
        for a, b in zip(jax.tree.leaves(state["params"][name]),
                        jax.tree.leaves(engine.params[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    completions = out["completions"]
    assert sum(len(c.ids) for c in completions) > 8
    rows = completion_rows(ids, [c.ids for c in completions], task.seq_len, 0)
    model = trainer.state.model.merge(state["params"])
    logp = np.asarray(token_logprobs(model, rows))
    for i, c in enumerate(completions):
        start = len(ids[i]) - 1
        np.testing.assert_allclose(logp[i, start:start + len(c.ids)], c.logprobs, atol=1e-4)


# --------------------------------------------------------------------------- the CLI


def _records(workdir, key):
    return [(r["step"], r[key]) for r in map(json.loads, (workdir / "metrics.jsonl")
                                             .read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory):
    """The SFT start of the GRPO and DPO runs (`grpo.py:smoke-sft`, trained in process)."""
    workdir = tmp_path_factory.mktemp("rl") / "sft"
    train.run(config.load("experiments/grpo.py:smoke-sft", {
        "sharding.print_table": False, "train.steps": 10, "train.progress_bar": False}), workdir)
    return workdir


def test_grpo_sigkill_and_resume_gives_the_same_rewards_and_losses(tmp_path, sft_start):
    """`grpo.py:smoke` (LoRA, beta > 0: the base is the reference; two updates per rollout
    batch), killed (SIGKILL) after its step-2 checkpoint and resumed: every step's rewards and
    losses equal a straight run's; rollout time has its own goodput line."""
    from tests.helpers import kill_when, popen

    run = ("--config", GRPO, f"--config.init.from={sft_start}", "--config.rl.beta=0.05",
           "--config.rl.num_iterations=2", "--config.finetune.lora.rank=4",
           "--config.sharding.print_table=false", "--config.train.steps=4")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the straight run's programs: the others load them from the session's compilation cache
    p = cli("train", *run, "--workdir", str(straight))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "eval reward" in p.stderr
    proc = popen("train", *run, "--workdir", str(killed))
    committed = killed / "checkpoints" / "2" / "_CHECKPOINT_METADATA"
    kill_when(lambda: committed.exists()
              and any(s >= 3 for s, _ in _records(killed, "train/loss")), proc)
    p = cli("train", *run, "--workdir", str(killed))
    assert p.returncode == 0 and "resumed from step" in p.stderr, p.stderr[-2000:]
    for key in ("train/loss", "train/reward", "train/kl", "train/completion_length"):
        assert _records(killed, key) == _records(straight, key), key
    assert [s for s, _ in _records(straight, "train/loss")] == [1, 2, 3, 4]
    assert all(v >= 0 for _, v in _records(straight, "train/kl"))  # logged: beta > 0
    assert _records(straight, "eval/reward/exact_answer")
    report = json.loads(cli("goodput", str(straight), "--json").stdout)
    assert report["badput_s"]["rollout"] > 0
    from infra import plot

    curve = plot.plot_runs([straight], tmp_path / "reward.png", metric="reward")
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="no finite train/nope or eval/nope"):
        plot.plot_runs([straight], tmp_path / "nope.png", metric="nope")


def test_dpo_trains_full_and_lora(tmp_path, sft_start):
    """DPO (in process) from the SFT start on JSONL pairs, full fine-tuning (the reference is
    init.from's parameters) and LoRA (the reference is the base weights): the loss on the pairs
    starts at log 2 (policy = reference) and falls."""
    from infra.data.arithmetic import problems

    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for p in problems(64, digits=2, seed=1, held_out=False):
            f.write(json.dumps({"prompt": p["prompt"], "chosen": p["answer"],
                                "rejected": str(int(p["answer"]) + 1)}) + "\n")
    for name, extra in (("full", {"optim.lr": 3e-3}),
                        ("lora", {"finetune.lora.rank": 4, "optim.lr": 3e-2})):
        workdir = tmp_path / name
        train.run(config.load("experiments/grpo.py:dpo-smoke", {
            "init.from": str(sft_start), "sharding.print_table": False,
            "data.source": "jsonl", "data.train_files": str(pairs),
            "data.eval_files": str(pairs), "train.steps": 8, "train.eval_every": 8,
            "train.progress_bar": False, **extra}), workdir)
        evals = _records(workdir, "eval/loss")
        assert evals[0][1] == pytest.approx(math.log(2), abs=1e-6), evals
        assert evals[-1][1] < evals[0][1] - 1e-3, (name, evals)


def test_generated_preference_pairs_prefer_the_sum_over_a_near_miss():
    keys = arithmetic.ArithmeticKeys(arithmetic_examples=200)
    train, held = keys.arithmetic_pairs(seed=0, fraction=0.1)
    assert len(train) == 200 and len(held) == 64
    assert not {r["prompt"] for _, _, r in train} & {r["prompt"] for _, _, r in held}
    for _, _, r in train + held:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert r["chosen"] == str(a + b) and r["rejected"] != r["chosen"]
        assert r["rejected"].isdigit()


def test_max_problems_demonstrate_the_format_only():
    keys = arithmetic.ArithmeticKeys(arithmetic_examples=1000, arithmetic_op="max")
    train, held = keys.arithmetic_records(seed=0, fraction=0.1)
    right = 0
    for _, _, r in train:
        a, b = (int(x) for x in r["prompt"][4:-2].split(","))
        assert r["prompt"] == f"max({a},{b})=" and r["answer"] == str(max(a, b))
        assert r["completion"] in (str(a), str(b))
        right += r["completion"] == r["answer"]
    assert 0.45 < right / len(train) < 0.6  # either number; both when they are equal
    assert all(arithmetic.exact_answer([], [r["answer"]], [r["answer"]]) == [1.0]
               for _, _, r in held)
