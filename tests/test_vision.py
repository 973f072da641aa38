"""Image classification: the fixed split, exact masked accuracy, sources, augmentation, models on
every mesh preset, resume, and the CLI."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infra import config, sharding, train
from infra.config import PRESETS
from infra.data import images as I
from infra.data.batching import ArraySource, held_out_batches
from infra.errors import ConfigError, DataError
from infra.tasks.image import ImageClassificationTask
from tests.helpers import assert_metric_everywhere, cli

SMOKE = "experiments/vit.py:smoke"
QUIET = {"train.progress_bar": False, "sharding.print_table": False}


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def eager_model(task):
    with nnx.use_eager_sharding(False):
        return task.build_model(nnx.Rngs(0))


def jitted(model, fn):
    """`fn(model, *args)` compiled once (eager op-by-op dispatch is slow)."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda st, *args: fn(nnx.merge(graphdef, st), *args))
    return lambda *args: compiled(state, *args)


# --------------------------------------------------------------------------- split and metric


def test_held_out_split_is_fixed_stratified_and_disjoint():
    labels = I.load_digits()[1]
    train_idx, test_idx = I.stratified_split(labels, 0.2, seed=0)
    again = I.stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(test_idx, again[1])
    assert not set(train_idx) & set(test_idx)
    assert sorted([*train_idx, *test_idx]) == list(range(len(labels)))
    for c in range(10):  # ~20% of every class, not of the whole set only
        n = (labels == c).sum()
        assert (labels[test_idx] == c).sum() == round(0.2 * n)
    assert not np.array_equal(I.stratified_split(labels, 0.2, seed=1)[1], test_idx)

    # The task's held-out set is that split; train.seed (shuffling, augmentation) leaves it alone.
    a = ImageClassificationTask(config.load(SMOKE)).data
    b = ImageClassificationTask(config.load(SMOKE, {"train.seed": 7})).data
    assert len(a.test_labels) == len(test_idx) == 359 and len(a.train_labels) == 1438
    np.testing.assert_array_equal(a.test_images, b.test_images)
    np.testing.assert_array_equal(a.test_labels, labels[test_idx])
    raw = I.load_digits()[0]
    raw_train = {raw[i].tobytes() for i in train_idx}
    in_both = sum(raw[i].tobytes() in raw_train for i in test_idx)  # the dataset's own duplicates
    train_rows = {r.tobytes() for r in a.train_images}
    assert sum(r.tobytes() in train_rows for r in a.test_images) == in_both < 5
    # standardised with the training split's statistics
    assert abs(a.train_images.mean()) < 1e-5 and abs(a.train_images.std() - 1) < 1e-4


def test_accuracy_summary_is_exact_with_padding():
    task = ImageClassificationTask(config.load(SMOKE))
    # by hand: 3 real examples in a padded batch of 4, plus a full batch of 4
    outputs = [
        {"loss": np.array([1.0, 2.0, 3.0, 100.0]), "correct": np.array([1.0, 0.0, 1.0, 1.0]),
         "mask": np.array([1.0, 1.0, 1.0, 0.0])},
        {"loss": np.array([0.0, 0.0, 4.0, 2.0]), "correct": np.array([1.0, 1.0, 0.0, 0.0]),
         "mask": np.ones(4)},
    ]
    out = task.summarize_eval(outputs)
    assert out["accuracy"] == pytest.approx(4 / 7) and out["loss"] == pytest.approx(12 / 7)
    assert out["examples"] == 7

    # a real model on 13 held-out digits, batched by 8 (the last batch has 3 padding rows)
    model, data = eager_model(task), task.data
    images, labels = data.test_images[:13], data.test_labels[:13]
    batches = held_out_batches(ArraySource({"image": images, "label": labels}),
                               global_batch_size=8, num_batches=None)
    assert [b["mask"].sum() for b in batches] == [8, 5]
    eval_fn, forward = jitted(model, task.eval_fn), jitted(model, lambda m, x: m(x))
    got = task.summarize_eval([jax.device_get(eval_fn(b)) for b in batches])
    logits = np.asarray(forward(images), np.float64)
    losses = -(logits[np.arange(13), labels] - np.log(np.exp(logits).sum(-1)))
    assert got["accuracy"] == np.mean(logits.argmax(-1) == labels)
    assert got["loss"] == pytest.approx(losses.mean(), rel=1e-5) and got["examples"] == 13


# --------------------------------------------------------------------------- sources


def _patterns(n_per_class, classes=3, size=12):
    """Class c: a bright c-th third of the image on black, RGB uint8, a little noise."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            img[:, c * size // classes:(c + 1) * size // classes] = 230
            images.append(img)
            labels.append(c)
    return np.stack(images), np.array(labels)


def test_npz_source(tmp_path):
    images, labels = _patterns(10)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels)
    s = I.load_splits(str(path), size=8, channels=1, test_fraction=0.2, split_seed=0)
    assert s.train_images.shape == (24, 8, 8, 1) and s.test_images.shape == (6, 8, 8, 1)
    assert sorted(s.test_labels.tolist()) == [0, 0, 1, 1, 2, 2] and s.class_names == ("0", "1", "2")
    # the bright third is where the label says, after resizing and conversion to grey
    raw = s.test_images[..., 0] * s.std + s.mean
    for img, c in zip(raw, s.test_labels):
        assert np.argmax([img[:, :3].mean(), img[:, 3:5].mean(), img[:, 5:].mean()]) == c

    # a .npz with its own test arrays keeps them as the held-out set
    np.savez(path, images=images[:20], labels=labels[:20], test_images=images[20:],
             test_labels=labels[20:])
    s = I.load_splits(str(path), size=12, channels=3, test_fraction=0.2, split_seed=0)
    assert s.train_images.shape == (20, 12, 12, 3)
    np.testing.assert_array_equal(s.test_labels, labels[20:])
    np.testing.assert_allclose(s.test_images * s.std + s.mean, images[20:] / 255.0, atol=1e-5)

    np.savez(path, pictures=images, labels=labels)
    with pytest.raises(DataError, match="has no array 'images'"):
        I.load_splits(str(path), size=8, channels=1, test_fraction=0.2, split_seed=0)


def test_folder_source(tmp_path):
    images, labels = _patterns(8)
    names = ("cat", "dog", "emu")
    for i, (img, c) in enumerate(zip(images, labels)):
        (tmp_path / names[c]).mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / names[c] / f"{i}.{'png' if i % 2 else 'jpg'}")
    s = I.load_splits(str(tmp_path), size=8, channels=3, test_fraction=0.25, split_seed=0)
    assert s.class_names == names and s.train_images.shape == (18, 8, 8, 3)
    assert sorted(s.test_labels.tolist()) == [0, 0, 1, 1, 2, 2]

    cfg = config.load(SMOKE, {"data.source": str(tmp_path), "model.channels": 3, "model.image_size": 8,
                              "model.num_classes": 3, "data.test_fraction": 0.25,
                              "train.batch_size": 8})
    task = ImageClassificationTask(cfg)
    (held_out,) = task.eval_batches(0, 1)
    assert held_out["image"].shape == (8, 8, 8, 3) and held_out["mask"].sum() == 6
    batch = next(task.train_iterator(0, 1))
    assert batch["image"].shape == (8, 8, 8, 3) and set(batch) == set(held_out)
    assert set(batch["label"]) <= {0, 1, 2}
    abstract = task.abstract_batch(8)  # what `infra plan` compiles against, without the data
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == \
        {k: (v.shape, v.dtype) for k, v in batch.items()}

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        I.load_splits(str(tmp_path), size=8, channels=3, test_fraction=0.25, split_seed=0)


def test_fit_images_resizes_and_converts_channels():
    grey = np.full((2, 4, 4, 1), 0.5, np.float32)
    out = I.fit_images(grey, size=8, channels=3)
    assert out.shape == (2, 8, 8, 3) and np.allclose(out, 0.5)
    rgb = np.zeros((1, 2, 2, 3), np.float32)
    rgb[..., 1] = 1.0
    assert np.allclose(I.fit_images(rgb, size=2, channels=1), 0.587)


# --------------------------------------------------------------------------- augmentation


def test_shifts_keep_the_digit_on_the_canvas_and_are_reproducible():
    data = ImageClassificationTask(config.load(SMOKE)).data
    fill = data.fill
    augment = I.shift_and_noise(1, 0.0, fill)
    shifted = 0
    for i in range(200):
        item = {"image": data.train_images[i], "label": data.train_labels[i]}
        out = augment(item, np.random.default_rng(i))["image"]
        ink = lambda x: np.sort((x - fill)[np.abs(x - fill) > 1e-5])  # noqa: E731
        np.testing.assert_allclose(ink(out), ink(item["image"]), atol=1e-6)  # nothing cropped
        shifted += not np.array_equal(out, item["image"])
        np.testing.assert_array_equal(out, augment(item, np.random.default_rng(i))["image"])
    assert shifted > 100
    cropping = I.shift_and_noise(1, 0.0, fill, keep_content=False)
    lost = [np.abs(cropping({"image": x}, np.random.default_rng(i))["image"] - fill).sum()
            < np.abs(x - fill).sum() - 1e-3 for i, x in enumerate(data.train_images[:200])]
    assert sum(lost) > 20  # plain shifts do cut strokes off
    noisy = I.shift_and_noise(0, 0.5, fill)({"image": data.train_images[0]}, np.random.default_rng(0))
    assert 0.4 < np.std(noisy["image"] - data.train_images[0]) < 0.6


# --------------------------------------------------------------------------- models and training


def test_models_have_logical_axes_and_the_right_output():
    for name, axes in (("vit", {("patch", "embed"), ("embed", "classes")}),
                       ("convnet", {("kernel", "kernel", "conv_in", "conv_out")})):
        cfg = config.load("experiments/vit.py:convnet" if name == "convnet" else SMOKE)
        model = eager_model(ImageClassificationTask(cfg))
        params = nnx.state(model, nnx.Param)
        names = [tuple(v.get_metadata()["out_sharding"]) for v in jax.tree.leaves(
            params, is_leaf=lambda x: isinstance(x, nnx.Variable))]
        assert all(len(n) >= 1 for n in names) and axes <= set(names)
        forward, size = jitted(model, lambda m, x: m(x)), cfg.model.image_size
        logits = forward(np.zeros((3, size, size, 1), np.float32))
        assert logits.shape == (3, 10) and logits.dtype == np.float32
        with pytest.raises(ConfigError, match="do not match"):
            forward(np.zeros((3, size + 1, size + 1, 1), np.float32))


def test_vit_cls_pool_and_bad_patch_size():
    cfg = config.load(SMOKE, {"model.pool": "cls"})
    model = eager_model(ImageClassificationTask(cfg))
    assert model.positions.shape == (17, 32)
    assert jitted(model, lambda m, x: m(x))(np.zeros((2, 16, 16, 1))).shape == (2, 10)
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        eager_model(ImageClassificationTask(config.load(SMOKE, {"model.patch_size": 3})))


def first_steps(preset: str) -> list[float]:
    """Loss and gradient norm of the smoke ViT's first two steps on `preset` (one layer, full
    learning rate from step 0: quick to compile, and step 2 sees step 1's update)."""
    trainer = train.build(config.load(SMOKE, {"sharding.preset": preset, "model.num_layers": 1,
                                              "optim.warmup_steps": 0}))
    state = trainer.state.init(jax.random.key(0))
    it = trainer.task.train_iterator(0, 1)
    out = []
    for _ in range(2):
        state, m = trainer.train_step(state, sharding.to_global(next(it), trainer.batch_shardings))
        out += [float(m["loss"]), float(m["grad_norm"])]  # grad norm: every weight's gradient
    return out


@pytest.fixture(scope="module")
def dp_steps():
    return first_steps("dp")


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "dp"])
def test_smoke_trains_on_every_mesh_preset_with_matching_losses(dp_steps, preset):
    assert np.isfinite(dp_steps).all() and abs(dp_steps[2] - dp_steps[0]) > 1e-3
    steps = first_steps(preset)
    assert np.isfinite(steps).all()
    np.testing.assert_allclose(steps, dp_steps, rtol=1e-4)


@pytest.mark.slow
def test_smoke_cli_logs_accuracy_and_a_resumed_run_matches_it(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    p = cli("train", "--config", SMOKE, "--workdir", str(straight), "--config.sharding.print_table=false")
    assert p.returncode == 0, p.stderr
    evals = [r for r in records(straight) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all(r["eval/examples"] == 359 for r in evals)  # every held-out digit, exactly once
    assert evals[-1]["eval/accuracy"] > 0.2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert "train/examples_per_sec" in [r for r in records(straight) if "train/loss" in r][-1]
    lines = p.stdout.strip().splitlines()
    assert lines[-2].startswith("eval accuracy ") and f"{evals[-1]['eval/accuracy']:.4f} (step 20)" in lines[-2]
    assert lines[-1].startswith("eval loss ")
    assert_metric_everywhere(straight, p.stderr, "accuracy")

    # Stopped at step 10 (a checkpoint with the augmented stream's position), then resumed.
    train.run(config.load(SMOKE, {**QUIET, "train.stop_at": 10}), resumed)
    assert (resumed / "checkpoints" / "10").is_dir()
    _, history = train.run(config.load(SMOKE, QUIET), resumed)
    assert history[-1]["step"] == 20
    a, b = records(straight), records(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/grad_norm", "eval/loss", "eval/accuracy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6), (ra["step"], key)


@pytest.mark.parametrize("args, message", [
    (("--config.data.source=/no/such/images",),
     "data.source '/no/such/images' does not exist; pass --config.data.source=digits"),
    (("--config.model.num_classes=5",), "set --config.model.num_classes=10"),
])
def test_bad_data_is_one_line_exit_2(tmp_path, args, message):
    p = cli("train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
