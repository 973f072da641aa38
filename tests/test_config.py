"""Config registry: loading experiments, typed overrides, clear errors, listing."""

import json

import pytest

from infra import config
from infra.errors import ConfigError


def test_load_variant_and_typed_overrides():
    c = config.load("experiments/lm.py:smoke", ["--config.optim.lr=3e-4", "--config.train.steps", "7",
                                                 "--config.model.tie_embeddings=false"])
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.model.tie_embeddings is False
    assert c.experiment == "experiments/lm.py:smoke"
    assert c.model.d_model == 64  # from the smoke variant, not the base


def test_notebook_load_with_mapping_and_short_names():
    c = config.load("lm:tiny", overrides={"optim.lr": 1, "mesh.fsdp": 2})
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)  # int widens to float
    assert c.mesh.fsdp == 2
    with pytest.raises(AttributeError):
        c.new_key = 1  # the result is locked


def test_tuple_override_is_parsed_as_literal():
    c = config.load("experiments/lm.py:smoke", {"sharding.rules": "(('batch', 'data'), ('embed', None))"})
    assert c.sharding.rules == (("batch", "data"), ("embed", None))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.lrr": 1e-3}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"lr": 1e-3}, "did you mean 'optim.lr'?"),
        ({"train.steps": "many"}, "config key 'train.steps' expects int, got 'many'"),
        ({"train.steps": 1.5}, "config key 'train.steps' expects int, got float 1.5"),
        ({"model.tie_embeddings": "maybe"}, "expects a bool"),
        ({"optim.lr": 0.0}, "optim.lr must be > 0"),
        ({"train.steps": 0}, "train.steps must be > 0"),
        ({"mesh.data": 0}, "mesh.data must be a positive int or -1"),
    ],
)
def test_bad_overrides_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load("experiments/lm.py:smoke", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_experiment_and_variant():
    with pytest.raises(ConfigError, match="unknown experiment 'nope'.*known experiments.*lm"):
        config.load("nope:tiny")
    with pytest.raises(ConfigError, match="unknown variant 'huge' of lm.py; known variants: smoke, tiny"):
        config.load("experiments/lm.py:huge")


def test_save_writes_resolved_config(tmp_path):
    c = config.load("experiments/lm.py:smoke", {"optim.lr": 5e-4})
    path = config.save(c, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["optim"]["lr"] == 5e-4 and saved["model"]["name"] == "transformer"


def test_every_experiment_variant_loads():
    for name, doc, variants in config.describe_experiments():
        assert doc, f"{name} needs a one-line docstring"
        assert "smoke" in variants, f"{name} needs a smoke variant"
        for variant in variants:
            config.load(f"{name}:{variant}")
