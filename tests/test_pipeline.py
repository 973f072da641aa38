"""Pipeline stages change where layers run, never the math: losses and gradients equal the
unpipelined model's, checkpoints move between pipelined and unpipelined meshes, a killed
pipelined run resumes bit-exactly, and the planner's bubble is what the program idles."""

import json
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infra import config, sharding, train
from infra.errors import ConfigError
from infra.models import pipeline
from infra.plan import plan
from tests.helpers import cli, popen, wait_for

PIPELINED = "experiments/lm.py:pipeline-smoke"  # 8 layers; data=2 x stage=4, 8 microbatches
# every run accumulates gradients over 2 steps of 16 rows, each split into 8 microbatches
BASE = {"train.steps": 10, "train.log_every": 1, "train.eval_every": 1000,
        "train.eval_at_start": False, "train.progress_bar": False,
        "sharding.print_table": False, "checkpoint.every": 1000, "train.batch_size": 32,
        "train.microbatches": 2}
FSDP = {"mesh.data": 1, "mesh.stage": 1, "mesh.fsdp": 8}  # the unpipelined reference
STAGES = {"mesh.data": 2, "mesh.stage": 4}
MESHES = {  # both layer layouts with both repeats; remat per tick once
    "data=2,stage=4": STAGES,
    "data=2,stage=4,R=2,scan": {**STAGES, "pipeline.repeats": 2, "model.scan_layers": True},
    "stage=2,fsdp=2,tensor=2,scan,remat": {"mesh.data": 1, "mesh.stage": 2, "mesh.fsdp": 2,
                                           "mesh.tensor": 2, "model.scan_layers": True,
                                           "model.remat": "full"},
    "stage=2,fsdp=2,tensor=2,R=2": {"mesh.data": 1, "mesh.stage": 2, "mesh.fsdp": 2,
                                    "mesh.tensor": 2, "pipeline.repeats": 2},
}

pytestmark = pytest.mark.slow


def losses(history) -> np.ndarray:
    return np.array([r["train/loss"] for r in history if "train/loss" in r])


def load(**overrides):
    return config.load(PIPELINED, {**BASE, **overrides})


def initial_grads(cfg) -> tuple[float, dict]:
    """Loss and gradients of the initial parameters on a fixed batch, on `cfg`'s mesh."""
    trainer = train.build(cfg)
    params = trainer.state.init(jax.random.key(0))["params"]
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (32, 65), np.int32)
    batch = trainer.to_global({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    merge = trainer.state.model.merge

    def loss(p):
        with sharding.activation_rules(trainer.mesh, trainer.rules), \
                pipeline.scheduled(trainer.schedule):
            return trainer.task.loss_fn(merge(p), batch, jax.random.key(0))[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unpipelined run (fsdp=8, a checkpoint every 4 steps): its losses, its initial loss
    and gradients, and its workdir."""
    cfg = load(**FSDP, **{"checkpoint.every": 4})
    workdir = tmp_path_factory.mktemp("ref")
    return losses(train.run(cfg, workdir)[1]), initial_grads(cfg), workdir


def differences(got, want) -> tuple[float, float]:
    """(the largest absolute difference, |got - want| / |want| over all leaves at once) of
    two parameter trees; `got` may be in the scan layout (blocks stacked), `want` the loop's."""
    if "0" not in got["blocks"] and 0 not in got["blocks"]:
        blocks = [want["blocks"][i] for i in sorted(want["blocks"], key=int)]
        want = {**want, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (got, want)]
    return (float(np.max(np.abs(flat[0] - flat[1]))),
            float(np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1])))


@pytest.mark.parametrize("mesh", MESHES)
def test_pipelined_training_equals_the_unpipelined_run(tmp_path, reference, mesh):
    overrides = MESHES[mesh]
    cfg = load(**overrides)
    trainer = train.build(cfg)
    assert trainer.schedule.repeats == overrides.get("pipeline.repeats", 1)
    # each stage holds its share of the layers: the stacked weights split over `stage`
    stages = overrides["mesh.stage"]
    if overrides.get("model.scan_layers"):
        q = trainer.state.abstract["params"]["blocks"]["attn"]["q"]
        assert q.shape[0] == 8 and q.sharding.shard_shape(q.shape)[0] == 8 // stages

    want, (ref_loss, ref_grads), _ = reference
    got = losses(train.run(cfg, tmp_path / "run")[1])
    assert len(got) == len(want) == 10
    diff = float(np.max(np.abs(got - want) / want))
    print(f"{mesh}: max relative loss difference {diff:.2e} over 10 steps")
    assert diff <= 1e-5

    loss, grads = initial_grads(cfg)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    # microbatches change the matmuls' shapes, so float32 rounding differs: about 1e-6 of
    # the gradient's norm, far below its largest entries (3e-2)
    absolute, relative = differences(grads, ref_grads)
    print(f"{mesh}: gradients differ by at most {absolute:.1e} ({relative:.1e} of their norm)")
    assert absolute <= 1e-6 and relative <= 2e-6


def test_a_checkpoint_moves_between_pipelined_and_unpipelined_meshes(tmp_path, reference):
    """The fsdp=8 run's step-4 checkpoint resumed on stage=4, and that run's own step-5
    checkpoint resumed on fsdp=8: each next step's loss is the uninterrupted run's."""
    want, _, ref_dir = reference
    workdir = tmp_path / "moved"
    shutil.copytree(ref_dir, workdir)
    for step in (8, 10):  # resume from step 4
        shutil.rmtree(workdir / "checkpoints" / str(step))
    for then, stop in ((STAGES, 5), (FSDP, 6)):
        state, history = train.run(load(**then, **{"train.stop_at": stop}), workdir)
        step, loss = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r][-1]
        print(f"step {step} on stage={then['mesh.stage']}: {loss} vs {want[step - 1]}")
        assert step == stop and loss == pytest.approx(want[step - 1], rel=1e-5)
        q = state["params"]["blocks"][0]["attn"]["q"]
        assert q.sharding.mesh.shape["stage"] == then["mesh.stage"]


def test_a_killed_pipelined_run_resumes_bit_identically(tmp_path):
    args = ("--config", PIPELINED, "--config.train.steps=12", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.checkpoint.every=4",
            "--config.sharding.print_table=false", "--config.model.scan_layers=true",
            "--config.pipeline.repeats=2")

    def records(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]

    straight = tmp_path / "straight"
    p = cli("train", *args, "--workdir", str(straight))
    assert p.returncode == 0, p.stderr
    killed = tmp_path / "killed"
    proc = popen("train", *args, "--workdir", str(killed))
    checkpoint = killed / "checkpoints" / "4" / "_CHECKPOINT_METADATA"
    wait_for(lambda: checkpoint.exists() and any(step >= 6 for step, _ in records(killed)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = cli("train", *args, "--workdir", str(killed))
    assert p.returncode == 0, p.stderr
    assert "resumed from step" in p.stderr
    assert records(killed) == records(straight)  # bit-identical floats


@pytest.mark.parametrize("repeats", [1, 2])
def test_the_planned_bubble_is_what_the_program_idles(repeats):
    """(S, M, R) = (4, 8, R): the compiled schedule counts its busy stage-ticks; the idle rest
    is the bubble `plan` reports, (S - 1) / (R M + S - 1)."""
    cfg = load(**{"pipeline.repeats": repeats})
    trainer = train.build(cfg)
    schedule = trainer.schedule
    assert (schedule.stages, schedule.microbatches, schedule.repeats) == (4, 8, repeats)
    layers = 8
    weights = jnp.ones((layers, 4, 4))
    x = jnp.ones((16, 8, 4))

    def chunk(w, h):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), h, w)[0]

    @jax.jit
    def count(weights, x):
        with sharding.activation_rules(trainer.mesh, trainer.rules):
            return pipeline.run(chunk, weights, [("layers", None, None)], x, (), (),
                                schedule=schedule)[1]

    busy = int(count(weights, x))
    idle = schedule.stages * schedule.ticks - busy
    assert busy == 4 * 8 * repeats
    planned = plan(cfg, devices=8, compile=False)
    print(f"R={repeats}: {idle} idle of {schedule.stages * schedule.ticks} stage-ticks; "
          f"planned bubble {planned.pipeline['bubble']:.4f}")
    assert planned.pipeline["bubble"] == pytest.approx(idle / (schedule.stages * schedule.ticks),
                                                       abs=1e-12)
    assert planned.pipeline["bubble"] == pytest.approx(3 / (8 * repeats + 3), abs=1e-12)


def test_a_released_8b_model_plans_on_two_slices_with_stages_over_dcn():
    p = plan(config.load("experiments/llama.py:llama3.1-8b"), devices=8,
             mesh="fsdp=4,dcn_stage=2", chip="v5p", compile=False)
    assert p.mesh["stage"] == 2 and p.dcn["stage"] == 2
    pp = p.pipeline
    assert pp["stages"] == 2 and pp["microbatches"] == 2
    assert pp["bubble"] == pytest.approx(1 / 3)
    assert pp["weights_bytes"] == p.params_bytes
    assert 0 < pp["activation_bytes"] and 0 < pp["point_to_point_bytes"]
    sends = [c for c in p.collectives if c.what.startswith("pipeline")]
    assert len(sends) == 1 and sends[0].dcn_bytes == pp["point_to_point_bytes"]
    assert sends[0].ici_bytes == 0
    out = cli("plan", "--config", "experiments/llama.py:llama3.1-8b", "--devices", "8",
              "--mesh", "fsdp=4,dcn_stage=2", "--chip", "v5p", "--no_compile")
    assert out.returncode == 0, out.stderr
    assert "bubble" in out.stdout and "33.3%" in out.stdout, out.stdout


@pytest.mark.parametrize("overrides, message", [
    ({"pipeline.microbatches": 6}, "pipeline.microbatches (6) must be a multiple of mesh.stage (4)"),
    ({"pipeline.repeats": 4}, "model.num_layers (8) must be a multiple of mesh.stage x "
                              "pipeline.repeats (4 x 4)"),
    ({"train.batch_size": 8}, "does not split into pipeline.microbatches=8"),
    ({"model.num_experts": 4, "model.moe_intermediate_size": 64}, "mixture-of-experts"),
])
def test_a_pipeline_the_model_cannot_take_is_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.build(load(**overrides))


def test_stages_for_a_model_without_a_pipeline_are_one_config_error():
    vit = config.load("experiments/vit.py:smoke", {"mesh.data": 2, "mesh.stage": 4})
    with pytest.raises(ConfigError, match="model.name='vit' has no pipeline; set "):
        train.build(vit)
