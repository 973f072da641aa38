"""Utilisation metrics, TensorBoard scalars read back with TensorBoard's own loader, profiles."""

import json

import pytest

from tests.helpers import cli

SCALARS = ("train/loss", "train/lr", "train/grad_norm", "train/step_time_s", "train/tokens_per_sec",
           "train/flops_per_step", "train/flops_per_sec_per_device", "train/mfu",
           "train/input_wait_frac", "train/compile_time_s", "eval/loss")


def test_event_files_read_back_with_tensorboards_checked_reader(tmp_path):
    """Our hand-encoded records pass TensorBoard's CRC checks; two writers in one directory
    within a second (a run and its resume) keep separate files."""
    from tensorboard.backend.event_processing import event_accumulator, event_file_loader

    from infra.event_file import EventFileWriter, crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    first, second = EventFileWriter(tmp_path), EventFileWriter(tmp_path)
    first.add_scalar("train/loss", 3.25, 1)
    first.add_scalar("moe/load/0", float("inf"), 2**40)
    second.add_scalar("train/loss", 2.5, 2)
    for w in (first, second):
        w.close()
    assert first.path != second.path
    events = list(event_file_loader.EventFileLoader(str(first.path)).Load())
    assert events[0].file_version == "brain.Event:2" and len(events) == 3
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.25), (2, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("moe/load/0")] == [(2**40, float("inf"))]


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
