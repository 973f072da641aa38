"""Forecasting: windows without look-ahead, the split, exact MAE/MASE, CSV input, training runs."""

import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from infra import config, sharding, train
from infra.config import PRESETS
from infra.data import series as S
from infra.tasks.forecast import ForecastTask, forecast_metrics
from tests.helpers import assert_metric_everywhere, cli

SMOKE = "experiments/forecast.py:smoke"
QUIET = {"train.progress_bar": False, "sharding.print_table": False}


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


DATA = dict(source="co2", csv_path="", columns="", targets="", date_column="", season=0)


# --------------------------------------------------------------------------- windows and split


def test_window_inputs_and_naive_never_see_values_after_the_origin():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(60, 2)).cumsum(axis=0)
    window, horizon, season = 12, 6, 5
    origins = S.window_origins(len(values), window, horizon, 0, len(values))
    inputs, targets = S.make_windows(values, origins, window, horizon, (1,))
    naive = S.seasonal_naive(values, origins, horizon, season, (1,))
    for i, t in enumerate(origins):
        poisoned = values.copy()
        poisoned[t + 1:] = np.nan if i % 2 else 1e30  # every value after the origin changes
        x, y = S.make_windows(poisoned, origins[i:i + 1], window, horizon, (1,))
        n = S.seasonal_naive(poisoned, origins[i:i + 1], horizon, season, (1,))
        np.testing.assert_array_equal(x[0], inputs[i])  # inputs unchanged
        np.testing.assert_array_equal(n[0], naive[i])  # the baseline too
        assert not np.array_equal(y[0], targets[i], equal_nan=True)  # the targets are the future
        np.testing.assert_array_equal(inputs[i][-1], values[t])  # the origin is the last input
        np.testing.assert_array_equal(targets[i][:, 0], values[t + 1:t + 1 + horizon, 1])


def test_no_test_window_input_lies_after_its_origin():
    task = ForecastTask(config.load("experiments/forecast.py:sunspots"))
    stamped = S.Series("t", np.arange(len(task.series), dtype=np.float64)[:, None], ("i",), (0,),
                       task.series.season)  # each value is its own time index
    d = task.config.data
    windows = S.split_windows(stamped, window=d.window, horizon=d.horizon,
                              val_fraction=d.val_fraction, test_fraction=d.test_fraction)
    test = windows["test"]
    np.testing.assert_array_equal(test.origins, task.windows["test"].origins)
    assert (test.inputs[..., 0].max(axis=1) == test.origins).all()
    assert (test.targets[..., 0].min(axis=1) == test.origins + 1).all()
    assert (test.naive[..., 0].max(axis=1) <= test.origins).all()


def test_seasonal_naive_repeats_the_last_season():
    values = np.arange(30, dtype=np.float64)[:, None]
    naive = S.seasonal_naive(values, np.array([20]), horizon=7, season=3, targets=(0,))
    # origin 20, m=3: the last season is 18, 19, 20, repeated
    np.testing.assert_array_equal(naive[0, :, 0], [18, 19, 20, 18, 19, 20, 18])
    naive = S.seasonal_naive(values, np.array([20]), horizon=2, season=1, targets=(0,))
    np.testing.assert_array_equal(naive[0, :, 0], [20, 20])  # m=1: the last value


@pytest.mark.parametrize("source", ["co2", "sunspots", "macro"])
def test_split_is_chronological_with_disjoint_target_periods(source):
    task = ForecastTask(config.load(f"experiments/forecast.py:{source}"))
    h = task.config.data.horizon
    periods = {}
    for name, w in task.windows.items():
        times = w.origins[:, None] + np.arange(1, h + 1)[None, :]
        periods[name] = (times.min(), times.max())
        assert len(w) > 0, name
    assert periods["train"][1] < periods["val"][0] <= periods["val"][1] < periods["test"][0]
    assert periods["test"][1] == len(task.series) - 1  # the test split runs to the end
    train_end, val_end = S.split_bounds(len(task.series), task.config.data.val_fraction,
                                        task.config.data.test_fraction)
    assert periods["train"][1] == train_end - 1 and periods["val"][0] == train_end
    assert periods["val"][1] == val_end - 1 and periods["test"][0] == val_end


def test_bundled_series_load_clean():
    co2 = S.load_co2()
    assert co2.season == 12 and len(co2) == 526 and np.isfinite(co2.values).all()
    assert co2.dates[0] == "1958-03" and co2.dates[-1] == "2001-12"
    sun = S.load_sunspots()
    assert sun.season == 11 and len(sun) == 309 and sun.dates[0] == "1700"
    macro = S.load_macro()
    assert macro.season == 4 and macro.values.shape == (203, 5) and macro.targets == (0, 1, 2)


# --------------------------------------------------------------------------- metrics


def test_mae_and_mase_match_a_hand_computation():
    # Two windows, horizon 2, one target column.
    prediction = np.array([[[10.0], [12.0]], [[11.0], [15.0]]])
    targets = np.array([[[11.0], [12.0]], [[13.0], [13.0]]])
    naive = np.array([[[8.0], [9.0]], [[10.0], [11.0]]])
    # |errors| model: 1, 0, 2, 2 -> MAE 5/4; naive: 3, 3, 3, 2 -> 11/4; MASE 5/11
    m = forecast_metrics(prediction, targets, naive, ["y"])
    assert m["mae"] == pytest.approx(1.25) and m["naive_mae"] == pytest.approx(2.75)
    assert m["mase"] == pytest.approx(5 / 11) and m["windows"] == 2
    # Two columns: MASE per column, then averaged; MAE over everything.
    two = forecast_metrics(np.concatenate([prediction, prediction], -1),
                           np.concatenate([targets, targets + 1], -1),
                           np.concatenate([naive, naive], -1), ["a", "b"])
    # column b (targets 12, 13, 14, 14): model |err| 2, 1, 3, 1 -> 7/4; naive 4, 4, 4, 3 -> 15/4
    assert two["mase/a"] == pytest.approx(5 / 11) and two["mase/b"] == pytest.approx(7 / 15)
    assert two["mase"] == pytest.approx((5 / 11 + 7 / 15) / 2)
    assert two["mae"] == pytest.approx((5 + 7) / 8)


def write_csv(path, n=60):
    t = np.arange(n)
    value = 50 + 0.5 * t + 5 * np.sin(2 * np.pi * t / 6)
    rows = [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{v:.6f},{i}" for i, v in zip(t, value)]
    rows[10] = rows[10].rsplit(",", 2)[0] + ",," + str(10)  # a gap in `value`
    order = list(range(n))[::-1]  # rows written newest first: the date column orders them
    path.write_text("date,value,other\n" + "\n".join(rows[i] for i in order) + "\n")
    return value


def csv_config(path, **extra):
    return config.load(SMOKE, {"data.source": "csv", "data.csv_path": str(path),
                               "data.columns": "value", "data.date_column": "date",
                               "data.season": 6, "data.window": 12, "data.horizon": 6,
                               "model.patch_len": 4, "train.batch_size": 8, **QUIET, **extra})


def test_csv_source_loads_sorts_and_fills_gaps(tmp_path):
    value = write_csv(tmp_path / "s.csv")
    series = S.load(csv_config(tmp_path / "s.csv").data)
    assert series.columns == ("value",) and series.season == 6 and len(series) == 60
    assert series.dates[0].startswith("2020-01-01 00")  # sorted by date
    np.testing.assert_allclose(np.delete(series.values[:, 0], 10), np.delete(value, 10), atol=1e-5)
    assert series.values[10, 0] == pytest.approx((value[9] + value[11]) / 2, abs=1e-5)


def test_csv_missing_column_is_a_one_line_error(tmp_path):
    write_csv(tmp_path / "s.csv")
    p = cli("train", "--config", SMOKE, "--workdir", str(tmp_path / "run"),
            "--config.data.source=csv", f"--config.data.csv_path={tmp_path / 's.csv'}",
            "--config.data.columns=price")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no column 'price'" in lines[0] and "value" in lines[0], p.stderr


# --------------------------------------------------------------------------- training

STEPS = 20  # the smoke variant's train.steps


@pytest.fixture(scope="module")
def reference():
    """The smoke variant on the `dp` preset (the default mesh: data=8), stepped by hand: initial
    state, the losses of a straight run and the eval outputs after step 1; other tests reuse it."""
    trainer = train.build(config.load(SMOKE, {"sharding.preset": "dp", **QUIET}))
    state = trainer.state.init(jax.random.key(0))
    initial = jax.device_get(state)
    it = trainer.task.train_iterator(0, 1)
    batches = [sharding.to_global(b, trainer.batch_shardings)
               for b in trainer.task.eval_batches(0, 1)]
    losses, eval_outputs = [], None
    for step in range(STEPS):
        state, metrics = trainer.train_step(state, sharding.to_global(next(it),
                                                                      trainer.batch_shardings))
        losses.append(float(metrics["loss"]))
        if step == 0:
            eval_outputs = jax.device_get([trainer.eval_step(state["params"], b) for b in batches])
    return {"trainer": trainer, "initial": initial, "losses": np.array(losses),
            "eval_outputs": eval_outputs, "eval": trainer.task.summarize_eval(eval_outputs)}


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "dp"])
def test_smoke_steps_on_every_preset_with_the_same_math(reference, preset):
    trainer = train.build(config.load(SMOKE, {"sharding.preset": preset, **QUIET}))
    # The reference's initial state, resharded: skips compiling another init.
    state = jax.device_put(reference["initial"], trainer.state.shardings)
    state, metrics = trainer.train_step(
        state, sharding.to_global(next(trainer.task.train_iterator(0, 1)), trainer.batch_shardings))
    assert float(metrics["skipped"]) == 0
    assert float(metrics["loss"]) == pytest.approx(reference["losses"][0], rel=1e-4)
    batches = [sharding.to_global(b, trainer.batch_shardings)
               for b in trainer.task.eval_batches(0, 1)]
    result = train.evaluate(trainer, state["params"], batches)
    for key in ("mase", "mae", "val_mase"):
        assert result[key] == pytest.approx(reference["eval"][key], rel=1e-4), key
    mesh = dict(trainer.mesh.shape)
    split = lambda dim, axis: dim // mesh[axis] if dim % mesh[axis] == 0 else dim  # noqa: E731
    head = state["params"]["head"]  # (patches, embed, horizon, targets): embed over fsdp
    assert head.addressable_shards[0].data.shape[1] == split(head.shape[1], "fsdp")
    q = state["params"]["blocks"][0]["attn"]["q"]  # (embed, heads, head_dim): heads over tensor
    assert q.addressable_shards[0].data.shape[:2] == (split(q.shape[0], "fsdp"),
                                                       split(q.shape[1], "tensor"))


@pytest.mark.slow
def test_stop_resume_through_cli_matches_a_straight_run_and_logs_mase(reference, tmp_path):
    """The first half in-process (stopping with a checkpoint), the rest through the CLI."""
    common = {"train.log_every": 1, "checkpoint.async_save": False}
    train.run(config.load(SMOKE, {**QUIET, **common, "train.stop_at": 10}), tmp_path)
    p = cli("train", "--config", SMOKE, "--workdir", str(tmp_path),
            "--config.sharding.print_table=false", "--config.train.log_every=1")
    assert p.returncode == 0, p.stderr
    assert "resumed from step 10" in p.stderr, p.stderr
    history = records(tmp_path)
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    assert [r["step"] for r in history if "train/loss" in r] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5)
    evals = [r for r in history if "eval/mase" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    for key in ("eval/mase", "eval/mae", "eval/naive_mae", "eval/val_mase"):
        assert np.isfinite(evals[-1][key]), key
    assert evals[-1]["eval/mase"] < evals[0]["eval/mase"]
    assert evals[-1]["eval/naive_mae"] == evals[0]["eval/naive_mae"]  # the baseline is fixed
    assert f"eval mase {evals[0]['eval/mase']:.4f} (step 0) -> {evals[-1]['eval/mase']:.4f} " \
        f"(step {STEPS})" in p.stdout, p.stdout
    assert "eval mae " in p.stdout
    assert_metric_everywhere(tmp_path, p.stderr, "mase")


def test_eval_outputs_hold_model_and_naive_on_the_same_test_windows(reference):
    trainer, outputs = reference["trainer"], reference["eval_outputs"]
    task = trainer.task
    out = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    real = out["mask"] > 0
    test = real & (out["origin"] >= task.test_start)
    values, m, h = task.series.values, task.series.season, task.config.data.horizon
    np.testing.assert_array_equal(out["origin"][test], task.windows["test"].origins)
    for origin, target, naive in zip(out["origin"][test], out["targets"][test], out["naive"][test]):
        np.testing.assert_allclose(target[:, 0], values[origin + 1:origin + 1 + h, 0], rtol=1e-6)
        hand = [values[origin - m + 1 + (step - 1) % m, 0] for step in range(1, h + 1)]
        np.testing.assert_allclose(naive[:, 0], hand, rtol=1e-6)
    summary = task.summarize_eval(outputs)
    expected = forecast_metrics(out["prediction"][test], out["targets"][test], out["naive"][test],
                                ["co2"])
    assert summary["mase"] == pytest.approx(expected["mase"])
    assert summary["mae"] == pytest.approx(expected["mae"])
    assert summary["windows"] == len(task.windows["test"])
    assert summary["val_windows"] == len(task.windows["val"]) > 0


def test_bad_forecast_config_is_rejected():
    with pytest.raises(config.ConfigError, match="not a multiple of model.patch_len"):
        train.build(config.load(SMOKE, {"model.patch_len": 5, **QUIET}))
    with pytest.raises(config.ConfigError, match="shorter than the season"):
        ForecastTask(config.load(SMOKE, {"data.window": 8, "model.patch_len": 4})).windows
    with pytest.raises(config.ConfigError, match="univariate"):
        S.load(ConfigDict(dict(DATA, columns="x")))
