"""Patch-transformer forecaster on real series bundled with statsmodels, or a CSV of your own.

    python -m infra train --config experiments/forecast.py:co2 --workdir runs/fc-co2
    python -m infra train --config experiments/forecast.py:sunspots --workdir runs/fc-sun
    python -m infra train --config experiments/forecast.py:co2 --workdir runs/fc-csv \\
        --config.data.source=csv --config.data.csv_path=my.csv --config.data.columns=value \\
        --config.data.date_column=date --config.data.season=7

Reported on the test split (the last `data.test_fraction` of the series): `eval/mae`,
`eval/naive_mae` and `eval/mase` = model MAE / seasonal-naive MAE over exactly the same test
windows and horizon steps, where the seasonal-naive forecast of step h from origin t is
y[t - m + 1 + ((h - 1) mod m)] (the last observed season repeated; m = 12 for monthly CO2,
11 for yearly sunspots, 4 for quarterly macro data). MASE < 1 beats seasonal-naive.
`eval/val_mase` is the same on the validation split: pick `train.steps` by it.
"""

from infra.config import base_config
from infra.models import model_config

VARIANTS = {
    "co2": "monthly Mauna Loa CO2, 48 months -> 12 (results: docs/workloads.md)",
    "sunspots": "yearly sunspots (309 points), 44 years -> 11",
    "macro": "quarterly US macro (5 input, 3 target columns), 24 quarters -> 4",
    "smoke": "seconds on 8 CPU devices; what tests and `infra smoke` run",
}

# train.steps of each variant were chosen by eval/val_mase (the validation split), not the test.
MODEL = dict(name="forecaster", patch_len=4, d_model=32, num_layers=2, num_heads=2, head_dim=16,
             mlp_dim=64, center="last", linear_skip=False, dtype="float32")


def get_config(arg: str | None = None):
    variant = arg or "co2"
    c = base_config("forecast")  # data defaults: CO2, 48 months -> 12 (infra/tasks/forecast.py)
    c.model = model_config(**MODEL)
    c.checkpoint.every = 500
    if variant == "co2":
        c.model.update(patch_len=12)
        c.train.update(steps=300, batch_size=32, log_every=50, eval_every=50)
        c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.1)
    elif variant == "sunspots":
        c.data.update(source="sunspots", window=44, horizon=11)
        c.model.update(patch_len=11)
        c.train.update(steps=200, batch_size=32, log_every=50, eval_every=50)
        c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.5)
    elif variant == "macro":
        c.data.update(source="macro", window=24, horizon=4)
        c.model.update(patch_len=4)
        c.train.update(steps=100, batch_size=32, log_every=25, eval_every=25)
        c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.5)
    elif variant == "smoke":
        c.data.update(source="co2", window=24, horizon=12)
        c.model.update(d_model=16, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32)
        c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10)
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.checkpoint.every = 10
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return c
