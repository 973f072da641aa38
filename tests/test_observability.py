"""Utilisation metrics, TensorBoard scalars read back with TensorBoard's own loader, profiles."""

import json

import pytest

from tests.helpers import cli

SCALARS = ("train/loss", "train/lr", "train/grad_norm", "train/step_time_s", "train/tokens_per_sec",
           "train/flops_per_step", "train/flops_per_sec_per_device", "train/mfu",
           "train/input_wait_frac", "train/compile_time_s", "eval/loss")


@pytest.mark.slow
def test_tensorboard_scalars_match_jsonl_and_profile_is_captured(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    p = cli("train", "--config", "experiments/lm.py:smoke", "--workdir", str(tmp_path),
            "--config.sharding.print_table=false", "--config.profile.steps=[10,12]")
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(SCALARS) <= tags, set(SCALARS) - tags
    for tag in SCALARS:
        from_jsonl = {r["step"]: r[tag] for r in records if tag in r}
        from_tb = {e.step: e.value for e in acc.Scalars(tag)}
        assert from_jsonl.keys() == from_tb.keys(), tag
        for step, value in from_jsonl.items():
            assert from_tb[step] == pytest.approx(value, rel=1e-6), (tag, step)
    train = [r for r in records if "train/mfu" in r]
    assert all(0 < r["train/mfu"] < 1.5 for r in train)
    assert all(0 <= r["train/input_wait_frac"] <= 1 for r in train)
    assert list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
