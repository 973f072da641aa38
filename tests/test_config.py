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


def test_every_model_hyper_parameter_is_a_known_overridable_key():
    import dataclasses

    from infra.models import get_model_class

    c = config.load("experiments/lm.py:smoke", {"model.causal_blocks": 1})
    assert c.model.causal_blocks == 1
    for spec in ("experiments/lm.py:smoke", "experiments/vit.py:smoke", "experiments/vit.py:convnet",
                 "experiments/dlrm.py:smoke", "experiments/forecast.py:smoke"):
        c = config.load(spec)
        fields = {f.name for f in dataclasses.fields(get_model_class(c.model.name).Config)}
        assert set(c.model.keys()) == fields | {"name"}, spec
    with pytest.raises(ConfigError, match="did you mean 'model.causal_blocks'"):
        config.load("experiments/lm.py:smoke", {"model.causal_block": 1})


@pytest.mark.parametrize("model, message", [
    ({"remat": None}, "model.remat is None; expected one of none, full, save_dots"),
    ({"scan_layers": "yes"}, "model.scan_layers must be bool, got 'yes'"),
    ({"d_model": 2.5}, "model.d_model must be int"),
    ({"num_heads": 4, "num_kv_heads": 3}, "must be a multiple of model.num_kv_heads"),
    ({"dtype": "float64"}, "model.dtype is 'float64'; expected one of float32, bfloat16, float16"),
    ({"warp": 9}, "unknown hyper-parameter model.warp for model 'transformer'"),
])
def test_model_values_are_checked_by_their_declared_types(model, message):
    from infra.models import hyper_params

    section = {**config.load("experiments/lm.py:smoke").model.to_dict(), **model}
    with pytest.raises(ConfigError) as e:
        hyper_params(section)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tasks_own_their_data_defaults_and_their_axis_rules():
    from infra.tasks import get_task_class, logical_rules

    image = get_task_class("image")
    assert config.base_config("image").data.to_dict() == image.Data.defaults()
    assert "patch" not in dict(config.DEFAULT_RULES)
    c = config.load("experiments/vit.py:smoke")
    rules = logical_rules(c)
    assert rules[:len(c.sharding.rules)] == tuple(c.sharding.rules)  # the config's rules win
    assert dict(rules)["conv_out"] == "tensor" and dict(rules)["patch"] is None
    assert dict(logical_rules(config.load("experiments/dlrm.py:smoke")))["table_rows"] == (
        "data", "fsdp", "tensor")


def test_library_errors_name_config_keys_and_the_cli_spells_flags():
    with pytest.raises(ConfigError) as e:
        config.load("experiments/lm.py:smoke", {"train.steps": 0})
    assert str(e.value) == "train.steps must be > 0, got 0; set train.steps=<positive>"
    assert e.value.cli_message() == "train.steps must be > 0, got 0; set --config.train.steps=<positive>"
    with pytest.raises(ConfigError) as e:
        config.load("experiments/lm.py:smoke", {"model.num_layers": 0})
    assert "--config" not in str(e.value) and "--config.model.num_layers" in e.value.cli_message()


def test_a_saved_config_gains_new_keys_and_a_broken_one_is_refused(tmp_path):
    from infra.errors import UserError

    saved = config.load("experiments/lm.py:smoke").to_dict()
    del saved["model"]["causal_blocks"], saved["checkpoint"]["keep"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    c = config.load_saved(tmp_path)
    assert c.model.causal_blocks == 4 and c.checkpoint.keep == 3
    for broken, message in [({"task": "lm"}, "no model section"),
                            ({"task": "nope", "model": {}}, "names no known task"),
                            ({**saved, "train": 3}, "'train' is int, not a section"),
                            ([1, 2], "is not a config")]:
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message):
            config.load_saved(tmp_path)


def test_every_section_is_typed_where_it_is_declared(tmp_path):
    """An experiment that writes a key no section declares, or a saved config.json whose value
    has the wrong type, is refused naming the key; components take their own typed section."""
    from infra import mesh as mesh_lib
    from infra.optim import make_optimizer

    exp = tmp_path / "typo.py"
    exp.write_text("from infra.config import base_config\n"
                   "def get_config(arg=None):\n"
                   "    c = base_config()\n"
                   "    c.train.stepz = 5\n"
                   "    return c\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'; did you mean "
                                          "'train.steps'"):
        config.load(str(exp))
    c = config.load("experiments/lm.py:smoke")
    saved = c.to_dict()
    saved["checkpoint"]["keep"] = "3"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"checkpoint.keep must be int, got '3' \(str\)"):
        config.load_saved(tmp_path)
    optim = config.OptimConfig.from_config(c.optim)
    assert isinstance(optim, config.OptimConfig) and optim.lr == c.optim.lr
    assert config.OptimConfig.from_config(optim) is optim
    tx, schedule = make_optimizer(optim, 10)
    assert float(schedule(10)) == pytest.approx(optim.lr * optim.min_lr_ratio)
    assert mesh_lib.mesh_shape(config.MeshConfig(data=2, fsdp=-1), 8) == (
        {"data": 2, "stage": 1, "fsdp": 4, "sequence": 1, "expert": 1,
         "tensor": 1},
        {"data": 1, "stage": 1, "fsdp": 1, "sequence": 1, "expert": 1,
         "tensor": 1})
    with pytest.raises(ConfigError, match="mesh.fsdp must be a positive int or -1"):
        config.MeshConfig(fsdp=0)
    assert config.base_config().train.to_dict() == config.TrainConfig.defaults()
