"""Forecasting: predict the next `data.horizon` steps of a series from the `data.window` before.

Metrics, on the TEST split (every test window: origins whose `horizon` targets all lie in the
test period), in the series' original units:

* `mae`: mean |forecast - actual| over every test window, horizon step and target column;
* `naive_mae`: the same for the seasonal-naive forecast of the same windows, steps and columns,
  where step h from origin t is y[t - m + 1 + ((h - 1) mod m)] (the last observed season
  repeated; m = `data.season`, by default 12 for monthly CO2, 11 for yearly sunspots (the solar
  cycle), 4 for quarterly macro data, 1 (the last value) for a CSV);
* `mase` = `mae / naive_mae` (per target column, then averaged over columns when there are
  several, each also logged as `mase/<column>`). MASE < 1 means the model beats seasonal-naive.

`val_mae`, `val_naive_mae`, `val_mase` are the same over the validation windows: choose
`train.steps` (early stopping) by them, not by the test figures. `loss` is the test loss.
Training minimises the mean absolute error in each window's normalised units (errors divided by
the input window's standard deviation), so every window weighs the same whatever its level.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra import models
from infra.data.batching import ArraySource, held_out_batches, shuffled_batches
from infra.data import series as series_lib
from infra.errors import ConfigError, check_positive_ints
from infra.section import Section
from infra.tasks.base import Batch, Metrics, Task

LOSSES = ("mae", "mse")


@dataclasses.dataclass(frozen=True)
class ForecastData(Section):
    prefix: ClassVar[str] = "data"

    source: str = "co2"  # co2 | sunspots | macro | csv
    csv_path: str = ""
    columns: str = ""
    targets: str = ""
    date_column: str = ""
    season: int = 0  # 0 = the source's default
    window: int = 48
    horizon: int = 12
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    loss: str = "mae"

    def validate(self) -> None:
        check_positive_ints("data", window=self.window, horizon=self.horizon)
        if self.season < 0:
            raise ConfigError(f"data.season must be a non-negative integer (0 = the source's "
                              f"default), got {self.season}", key="data.season", value=12,
                              verb="e.g.")
        if self.loss not in LOSSES:
            raise ConfigError(f"data.loss is '{self.loss}'; expected one of {', '.join(LOSSES)}")


class ForecastTask(Task):
    """Sliding-window forecasting of `config.data.source` (co2 | sunspots | macro | csv)."""

    unit = "examples"
    headline_metrics = ("mase", "mae")
    Data = ForecastData
    # Time steps of an input window and of the forecast horizon; input / target columns.
    logical_rules = (("window", None), ("horizon", None), ("features", None))

    @functools.cached_property
    def series(self) -> series_lib.Series:
        return series_lib.load(self.data_config)

    @functools.cached_property
    def windows(self) -> dict[str, series_lib.Windows]:
        d = self.data_config
        return series_lib.split_windows(self.series, window=d.window, horizon=d.horizon,
                                        val_fraction=d.val_fraction, test_fraction=d.test_fraction)

    @functools.cached_property
    def test_start(self) -> int:
        """The first origin of the test split (its targets start right after it)."""
        return int(self.windows["test"].origins[0])

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return models.build_model(self.config.model, rngs=rngs, window=self.data_config.window,
                                  horizon=self.data_config.horizon,
                                  features=len(self.series.columns),
                                  target_channels=self.series.targets)

    def _errors(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """(forecast, per-window loss) in original units / normalised units."""
        prediction = model(batch["inputs"])
        err = (prediction - batch["targets"]) / model.target_scale(batch["inputs"])
        per = jnp.abs(err) if self.data_config.loss == "mae" else jnp.square(err)
        return prediction, jnp.mean(per, axis=(1, 2))

    def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # deterministic model
        prediction, per_window = self._errors(model, batch)
        mask = batch["mask"]
        loss = jnp.sum(per_window * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        mae = jnp.sum(jnp.mean(jnp.abs(prediction - batch["targets"]), axis=(1, 2)) * mask)
        return loss, {"mae": mae / jnp.maximum(jnp.sum(mask), 1.0)}

    def eval_fn(self, model: nnx.Module, batch: Batch) -> Metrics:
        """Per-window outputs; `summarize_eval` turns them into exact MAE / MASE."""
        prediction, per_window = self._errors(model, batch)
        return {"prediction": prediction, "targets": batch["targets"], "naive": batch["naive"],
                "mask": batch["mask"], "origin": batch["origin"], "loss": per_window}

    def summarize_eval(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
        out = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
        real = out["mask"] > 0
        test = real & (out["origin"] >= self.test_start)
        val = real & (out["origin"] < self.test_start)
        names = [self.series.columns[c] for c in self.series.targets]
        metrics = forecast_metrics(out["prediction"][test], out["targets"][test],
                                   out["naive"][test], names)
        metrics["loss"] = float(np.mean(out["loss"][test]))
        if val.any():
            for k, v in forecast_metrics(out["prediction"][val], out["targets"][val],
                                         out["naive"][val], names).items():
                if "/" not in k:
                    metrics[f"val_{k}"] = v
        return metrics

    def train_iterator(self, process_index: int, process_count: int, start_step: int = 0):
        return shuffled_batches(
            ArraySource(self.windows["train"].arrays()),
            global_batch_size=self.config.train.batch_size, seed=self.config.train.seed,
            process_index=process_index, process_count=process_count, start_step=start_step,
            mask=True, what=f"{self.series.name} training",
        )

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """Every validation window, then every test window, each exactly once (padded, masked)."""
        val, test = self.windows["val"].arrays(), self.windows["test"].arrays()
        both = {k: np.concatenate([val[k], test[k]]) for k in test}
        return held_out_batches(ArraySource(both), global_batch_size=self.config.train.batch_size,
                                process_index=process_index, process_count=process_count,
                                what=f"{self.series.name} validation + test")

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        return {"inputs": ("batch", "window", "features"),
                "targets": ("batch", "horizon", "features"),
                "naive": ("batch", "horizon", "features"),
                "origin": ("batch",), "mask": ("batch",)}


def forecast_metrics(prediction: np.ndarray, targets: np.ndarray, naive: np.ndarray,
                     names: list[str]) -> dict[str, float]:
    """MAE, seasonal-naive MAE and MASE over (windows, horizon, targets) arrays, in float64.

    MASE is each target column's MAE over its naive MAE, averaged over columns (for one column,
    exactly model MAE / seasonal-naive MAE over the same windows and steps).
    """
    prediction, targets, naive = (np.asarray(a, np.float64) for a in (prediction, targets, naive))
    err = np.abs(prediction - targets).reshape(-1, targets.shape[-1])
    naive_err = np.abs(naive - targets).reshape(-1, targets.shape[-1])
    per_mae, per_naive = err.mean(axis=0), naive_err.mean(axis=0)
    per_mase = per_mae / np.where(per_naive > 0, per_naive, np.nan)
    metrics = {"mae": float(err.mean()), "naive_mae": float(naive_err.mean()),
               "mase": float(np.mean(per_mase)), "windows": float(len(targets))}
    if len(names) > 1:
        metrics |= {f"mase/{n}": float(m) for n, m in zip(names, per_mase)}
    return metrics
