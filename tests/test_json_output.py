"""What the commands print as JSON is JSON: a non-finite metric is `null`, never `NaN`."""

from __future__ import annotations

import json
import math
import types

import numpy as np


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_dumps_writes_null_for_non_finite_values():
    from infra import jsonout

    value = {"a": float("nan"), "b": [1.5, float("inf"), (-math.inf,)], "c": np.float32("nan"),
             "d": np.int64(3), "e": "text", "f": {"g": np.float64(2.0)}}
    assert strict_loads(jsonout.dumps(value)) == {"a": None, "b": [1.5, None, [None]], "c": None,
                                                  "d": 3, "e": "text", "f": {"g": 2.0}}


def test_eval_prints_null_for_a_nan_loss(monkeypatch, capsys):
    from infra import evaluate

    monkeypatch.setattr(evaluate, "evaluate_checkpoint",
                        lambda workdir, step=None: ({"loss": float("nan"), "accuracy": 0.5}, 7))
    assert evaluate.run_cli(types.SimpleNamespace(workdir="w", step=None)) == 0
    assert strict_loads(capsys.readouterr().out) == {"step": 7, "eval/loss": None,
                                                      "eval/accuracy": 0.5}
