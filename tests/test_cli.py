"""The CLI as users run it: train, resume after a kill, bad input, list, smoke."""

import json

import pytest

from tests.helpers import cli, kill_when, popen

SMOKE = "experiments/lm.py:smoke"
QUIET = ("--config.sharding.print_table=false",)


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_smoke_through_cli(tmp_path):
    p = cli("train", "--config", SMOKE, "--workdir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    evals = [r for r in records(tmp_path) if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval/loss"] < 0.8 * evals[0]["eval/loss"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["experiment"] == SMOKE and saved["train"]["steps"] == 30
    assert (tmp_path / "checkpoints" / "30" / "commit_success.txt").exists() or \
        (tmp_path / "checkpoints" / "30").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    train = [r for r in records(tmp_path) if "train/loss" in r]
    assert {"train/loss", "train/tokens_per_sec", "train/lr", "train/grad_norm"} <= set(train[-1])
    assert "blocks/0/attn/q" in p.stdout  # the sharding table
    # The task's headline eval metric reaches the progress output (one line per update when
    # stderr is not a terminal) and the final summary line.
    assert "step 30/30  eval loss " in p.stderr, p.stderr
    assert f"eval loss {evals[0]['eval/loss']:.4f} (step 0) -> {evals[-1]['eval/loss']:.4f} (step 30)" in p.stdout
    # An evaluation-only run of a checkpoint reuses the loop's Evaluator on the same batches.
    before = sorted(f.name for f in tmp_path.rglob("*"))
    p = cli("eval", "--workdir", str(tmp_path), "--step", "20")
    assert p.returncode == 0, p.stderr
    at_20 = json.loads(p.stdout.strip().splitlines()[-1])
    p = cli("eval", "--workdir", str(tmp_path))
    latest = json.loads(p.stdout.strip().splitlines()[-1])
    assert latest == {"step": 30, **{k: v for k, v in evals[-1].items() if k.startswith("eval/")}}
    assert at_20["step"] == 20 and at_20["eval/loss"] > latest["eval/loss"]
    assert sorted(f.name for f in tmp_path.rglob("*")) == before  # read-only


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint_and_data_position(tmp_path):
    steps = ("--config.train.steps=120", "--config.checkpoint.every=20", "--config.train.log_every=10",
             "--config.train.eval_every=60")
    straight = tmp_path / "straight"
    assert cli("train", "--config", SMOKE, "--workdir", str(straight), *steps, *QUIET).returncode == 0

    killed = tmp_path / "killed"
    proc = popen("train", "--config", SMOKE, "--workdir", str(killed), *steps, *QUIET)
    ckpts = killed / "checkpoints"
    kill_when(lambda: any(p.name.isdigit() and int(p.name) >= 40 for p in ckpts.glob("*")), proc)
    saved = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
    assert saved and saved[-1] < 120, "the run finished before it could be killed"

    p = cli("train", "--config", SMOKE, "--workdir", str(killed), *steps, *QUIET)
    assert p.returncode == 0, p.stderr
    resumed_from = int(p.stderr.split("resumed from step ")[1].split()[0])
    assert resumed_from in saved
    data_state = json.loads(next((ckpts / "120" / "data").glob("process_*.json")).read_text())
    assert data_state == {"next_index": 120}  # 120 batches consumed, none skipped or repeated

    # same step count, and the same curve as the run that was never interrupted
    a, b = records(straight), records(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "eval/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--config.optim.lrr=1e-3",), "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (("--config.train.steps=ten",), "config key 'train.steps' expects int, got 'ten'"),
        (("--config.mesh.data=3",), "needs 3 devices but 8 are available"),
        (("--config.train.batch_size=12",), "train.batch_size=12 is not divisible by the 8 batch shards"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    p = cli("train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert message in lines[0] and lines[0].startswith("error: ")
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_list_prints_experiments_and_variants():
    p = cli("list")
    assert p.returncode == 0, p.stderr
    assert "experiments/lm.py:" in p.stdout
    for variant in ("smoke", "tiny", "125m", "1b", "8b"):
        assert f"experiments/lm.py:{variant}" in p.stdout
    # sizes are the models' own counts, not figures typed into a description
    tiny = next(line for line in p.stdout.splitlines() if "experiments/lm.py:tiny " in line)
    assert tiny.endswith("[3.25M parameters]"), tiny


def test_parameter_counts_are_the_models_parameters():
    import math

    import jax

    from infra import config
    from infra.cli import parameter_count
    from infra.run import abstract_params

    for spec, extra in (("experiments/lm.py:tiny", {}), ("experiments/llama.py:smoke", {}),
                        ("experiments/lm.py:smoke", {"model.qkv_bias": True, "model.out_bias": True,
                                                     "model.mlp_bias": True, "model.qk_norm": True,
                                                     "model.tie_embeddings": False})):
        leaves = jax.tree.leaves(abstract_params(config.load(spec, extra)))
        counted = sum(math.prod(x.shape) for x in leaves)
        if not extra:
            assert parameter_count(spec) == counted, spec
        from infra.models import hyper_params

        assert hyper_params(config.load(spec, extra).model).num_params == counted, spec
    assert parameter_count("experiments/vit.py:smoke") is None  # no count declared


@pytest.mark.slow
def test_smoke_command_prints_pass_table():
    p = cli("smoke", "experiments/lm.py")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "experiments/lm.py" in p.stdout and "PASS" in p.stdout
