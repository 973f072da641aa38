"""Time series for forecasting: loaders, a chronological split and sliding windows.

Sources (no download): statsmodels' bundled `co2` (weekly Mauna Loa CO2 with gaps, resampled to
monthly means, the five empty months linearly interpolated; all five lie in 1958-1964, inside the
training period), `sunspots` (yearly), `macrodata` (quarterly US macro, several columns), and a
user's CSV file.

Windows. A window is named by its forecast origin `t` (a time index): its inputs are the values at
`t - window + 1 .. t` (up to and including the origin), its targets the target columns at
`t + 1 .. t + horizon`. Nothing after `t` enters the inputs, and the seasonal-naive forecast of the
same window uses values at or before `t` only: step `h` is `y[t - m + 1 + ((h - 1) mod m)]`, the
last observed season repeated.

Split. The time axis is cut into consecutive periods train | validation | test; a window belongs to
the period that holds *all* its targets, so the target periods of the splits never overlap. Inputs
may reach back into earlier periods: that is the past, known at the origin.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from infra.errors import ConfigError, DataError

#: Seasonal period per bundled source: months per year, the ~11-year solar cycle, quarters.
SEASONS = {"co2": 12, "sunspots": 11, "macro": 4}
MACRO_COLUMNS = ("realgdp", "realcons", "realinv", "unemp", "tbilrate")
MACRO_TARGETS = ("realgdp", "realcons", "realinv")  # all in billions of chained 2005 dollars


@dataclasses.dataclass(frozen=True)
class Series:
    """A regularly sampled series: values (time, columns), the columns to forecast, the season."""

    name: str
    values: np.ndarray  # float64 (time, columns), no NaN
    columns: tuple[str, ...]
    targets: tuple[int, ...]  # indices into `columns` of the forecast columns
    season: int
    dates: tuple[str, ...] = ()  # one label per time step, when known

    def __len__(self) -> int:
        return len(self.values)


def split_names(text: str | tuple | list) -> tuple[str, ...]:
    """`"a, b"` or `("a", "b")` -> `("a", "b")`."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(s.strip() for s in items if str(s).strip())


def _make_series(name: str, frame, columns: tuple[str, ...], targets: tuple[str, ...], season: int,
                 what: str) -> Series:
    """Validate column names, fill interior gaps linearly, trim leading/trailing gaps."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} has no column '{missing[0]}' (columns: "
                        f"{', '.join(map(str, frame.columns))})", key="data.columns", value="<names>")
    targets = targets or columns
    extra = [c for c in targets if c not in columns]
    if extra:
        raise ConfigError(f"data.targets '{extra[0]}' is not one of data.columns "
                          f"({', '.join(columns)}); list it in data.columns too")
    import pandas as pd

    data = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in columns if data[c].isna().all()]
    if bad:
        raise DataError(f"{what} column '{bad[0]}' has no numeric values; pick a numeric column")
    data = data.interpolate(limit_area="inside")  # interior gaps; then drop ragged ends
    keep = data.notna().all(axis=1).to_numpy()
    first, last = int(np.argmax(keep)), len(keep) - int(np.argmax(keep[::-1]))
    data = data.iloc[first:last]
    dates = tuple(str(d) for d in data.index) if not isinstance(data.index, pd.RangeIndex) else ()
    return Series(name=name, values=data.to_numpy(np.float64), columns=columns,
                  targets=tuple(columns.index(c) for c in targets), season=season, dates=dates)


def load_co2() -> Series:
    """Mauna Loa CO2 (ppm), weekly 1958-2001, as monthly means with gaps interpolated."""
    import statsmodels.api as sm

    weekly = sm.datasets.co2.load_pandas().data
    monthly = weekly.resample("MS").mean()
    monthly.index = monthly.index.strftime("%Y-%m")
    return _make_series("co2", monthly, ("co2",), (), SEASONS["co2"], "co2")


def load_sunspots() -> Series:
    """Yearly mean sunspot number, 1700-2008."""
    import statsmodels.api as sm

    frame = sm.datasets.sunspots.load_pandas().data
    frame.index = frame["YEAR"].astype(int).astype(str)
    frame = frame.rename(columns={"SUNACTIVITY": "sunactivity"})
    return _make_series("sunspots", frame, ("sunactivity",), (), SEASONS["sunspots"], "sunspots")


def load_macro(columns: tuple[str, ...] = (), targets: tuple[str, ...] = ()) -> Series:
    """Quarterly US macro data 1959Q1-2009Q3 (statsmodels `macrodata`)."""
    import statsmodels.api as sm

    frame = sm.datasets.macrodata.load_pandas().data
    frame.index = [f"{int(y)}Q{int(q)}" for y, q in zip(frame["year"], frame["quarter"])]
    if not columns:
        columns, targets = MACRO_COLUMNS, targets or MACRO_TARGETS
    return _make_series("macro", frame, columns, targets, SEASONS["macro"], "macrodata")


def load_csv(path: str, columns: tuple[str, ...], targets: tuple[str, ...] = (),
             date_column: str = "", season: int = 1) -> Series:
    """`columns` of the CSV at `path`, rows in file order or sorted by `date_column`."""
    import pandas as pd

    if not path:
        raise ConfigError("data.source is 'csv' but data.csv_path is empty",
                          key="data.csv_path", value="<file.csv>")
    if not Path(path).is_file():
        raise DataError(f"data.csv_path '{path}' does not exist",
                        key="data.csv_path", value="<existing file.csv>")
    if not columns:
        raise ConfigError("data.columns is empty; name the CSV column(s) to forecast",
                          key="data.columns", value="value", verb="e.g.")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data.csv_path '{path}' as CSV "
                        f"({str(e).splitlines()[0]}); check the file") from None
    if date_column:
        if date_column not in frame.columns:
            raise DataError(f"{path} has no column '{date_column}' (columns: "
                            f"{', '.join(map(str, frame.columns))})",
                            key="data.date_column", value="<name>", note=" or ''")
        dates = pd.to_datetime(frame[date_column], errors="coerce")
        if dates.isna().any():
            row = int(np.argmax(dates.isna().to_numpy()))
            raise DataError(f"{path}: column '{date_column}' has an unparseable date in row "
                            f"{row + 2} ('{frame[date_column].iloc[row]}'); fix the file")
        frame = frame.set_index(dates.dt.strftime("%Y-%m-%d %H:%M:%S")).iloc[np.argsort(
            dates.to_numpy(), kind="stable")]
    return _make_series(Path(path).stem, frame, columns, targets, season, path)


def load(data_cfg) -> Series:
    """The series that `config.data` names (`source`: co2 | sunspots | macro | csv)."""
    source = data_cfg.source
    columns, targets = split_names(data_cfg.columns), split_names(data_cfg.targets)
    if source == "co2":
        series = load_co2()
    elif source == "sunspots":
        series = load_sunspots()
    elif source == "macro":
        series = load_macro(columns, targets)
    elif source == "csv":
        series = load_csv(data_cfg.csv_path, columns, targets, data_cfg.date_column)
    else:
        raise ConfigError(f"unknown data.source '{source}'; known: co2, sunspots, macro, csv")
    if source in ("co2", "sunspots") and (columns or targets):
        raise ConfigError(f"data.source '{source}' is univariate; leave data.columns and "
                          "data.targets empty (use source=macro or csv for several columns)")
    if data_cfg.season:
        series = dataclasses.replace(series, season=int(data_cfg.season))
    return series


# --------------------------------------------------------------------------- split and windows


def split_bounds(n_time: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(train_end, val_end): train [0, train_end), validation [train_end, val_end), test after."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction="
                          f"{test_fraction} must be in [0, 1) and (0, 1) with a sum below 1; "
                          "e.g. 0.1 and 0.2")
    val_end = n_time - int(round(n_time * test_fraction))
    train_end = val_end - int(round(n_time * val_fraction))
    return train_end, val_end


def window_origins(n_time: int, window: int, horizon: int, lo: int, hi: int) -> np.ndarray:
    """Every origin `t` with a full input window (`t >= window - 1`) and its targets in [lo, hi)."""
    first = max(window - 1, lo - 1)
    last = min(hi, n_time) - horizon - 1
    return np.arange(first, last + 1, dtype=np.int64) if last >= first else np.zeros(0, np.int64)


def make_windows(values: np.ndarray, origins: np.ndarray, window: int, horizon: int,
                 targets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, window, columns) = values[t-window+1 .. t], targets (n, horizon, len(targets))
    = values[t+1 .. t+horizon, targets]) for each origin t."""
    origins = np.asarray(origins, dtype=np.int64)
    past = origins[:, None] + np.arange(1 - window, 1)[None, :]
    future = origins[:, None] + np.arange(1, horizon + 1)[None, :]
    if origins.size and (past.min() < 0 or future.max() >= len(values)):
        raise ValueError("a window reaches outside the series")
    return values[past], values[future][..., list(targets)]


def seasonal_naive(values: np.ndarray, origins: np.ndarray, horizon: int, season: int,
                   targets: tuple[int, ...]) -> np.ndarray:
    """(n, horizon, len(targets)): step h from origin t is values[t - m + 1 + ((h - 1) mod m)]."""
    origins = np.asarray(origins, dtype=np.int64)
    steps = np.arange(1, horizon + 1)
    index = origins[:, None] - season + 1 + (steps[None, :] - 1) % season
    if origins.size and index.min() < 0:
        raise ValueError("the seasonal-naive forecast needs `season` values before the origin")
    return values[index][..., list(targets)]


@dataclasses.dataclass(frozen=True)
class Windows:
    """The windows of one split, ready for `ArraySource`: float32 arrays plus their origins."""

    origins: np.ndarray  # (n,) int64
    inputs: np.ndarray  # (n, window, columns)
    targets: np.ndarray  # (n, horizon, targets)
    naive: np.ndarray  # (n, horizon, targets)

    def __len__(self) -> int:
        return len(self.origins)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs.astype(np.float32),
                "targets": self.targets.astype(np.float32),
                "naive": self.naive.astype(np.float32), "origin": self.origins.astype(np.int32)}


def split_windows(series: Series, *, window: int, horizon: int, val_fraction: float,
                  test_fraction: float) -> dict[str, Windows]:
    """{"train", "val", "test"}: every window whose targets lie in that split's period."""
    if window < series.season:
        raise ConfigError(f"data.window={window} is shorter than the season ({series.season}); "
                          "the seasonal-naive baseline needs a full season of inputs: raise "
                          "data.window")
    train_end, val_end = split_bounds(len(series), val_fraction, test_fraction)
    periods = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, len(series))}
    out = {}
    for name, (lo, hi) in periods.items():
        origins = window_origins(len(series), window, horizon, lo, hi)
        inputs, targets = make_windows(series.values, origins, window, horizon, series.targets)
        naive = seasonal_naive(series.values, origins, horizon, series.season, series.targets)
        out[name] = Windows(origins, inputs, targets, naive)
    for name in ("train", "test"):
        if not len(out[name]):
            raise DataError(
                f"{series.name} ({len(series)} steps) leaves no {name} window of "
                f"window={window} + horizon={horizon} steps; lower data.window / data.horizon "
                f"or change data.val_fraction / data.test_fraction")
    return out
