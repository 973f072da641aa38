"""Hostile input to `hf import`, `init.from` and `hf export`: downloaded files made corrupt in
the test (offsets, NaN weights, index files, FIFOs, paths that leave the model directory, chat
templates), full and read-only targets, staging directories that are not ours, a concurrent
import. Each is one line naming the problem and the fix, exit 2 (3 for a full disk), and
nothing is written or deleted that was not the command's own.

Most cases call `import_hf` / `export_hf` in-process (the CLI prints `error: ` + the message and
exits with `exit_code`); a few run the real CLI where the process itself is what is tested (a
FIFO that would hang it, `train --config.init.from`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from infra.errors import UserError
from infra.interop.exporter import export_hf
from infra.interop.importer import import_hf
from infra.interop.staging import MARKER
from tests.helpers import cli, fill

os.environ["HF_HUB_OFFLINE"] = "1"
UP = "model.layers.1.mlp.up_proj.weight"


def refused(fn, *args, code: int = 2, **kwargs) -> str:
    """The one-line message of a call that must refuse with exit `code`."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert info.value.exit_code == code and "\n" not in message, (info.value.exit_code, message)
    return message


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_header(file: Path, change) -> None:
    """Apply `change(header)` to a safetensors file's JSON header, keeping its data bytes."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): b"" if p.is_dir() else p.read_bytes()
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def imported(llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama imported once, for the export cases."""
    return import_hf(llama_dir, tmp_path_factory.mktemp("imported") / "wd")


# --- the checkpoint's files ---------------------------------------------------------------------

def test_safetensors_byte_ranges_are_validated(llama_dir, tmp_path):
    def negative(header):  # the header's own JSON bytes read as a tensor: used to import
        start, end = header[UP]["data_offsets"]
        header[UP]["data_offsets"] = [-256, end - start - 256]

    def shared(header):  # two layers read the same bytes: used to be copied silently
        header[UP]["data_offsets"] = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]

    def by_offset(header):
        return sorted((n for n in header if n != "__metadata__"),
                      key=lambda n: header[n]["data_offsets"])

    def trailing(header):  # bytes after the last tensor
        header.pop(by_offset(header)[-1])

    def hole(header):  # bytes before the first
        header.pop(by_offset(header)[0])

    cases = {"negative": (negative, "byte range [-256"), "shared": (shared, "share bytes"),
             "trailing": (trailing, "after its last tensor"), "hole": (hole, "belong to no tensor")}
    for name, (change, needle) in cases.items():
        d = copy(llama_dir, tmp_path / name)
        rewrite_header(d / "model.safetensors", change)
        message = refused(import_hf, d, tmp_path / f"wd-{name}")
        assert needle in message and "download or copy it again" in message, (name, message)
        assert not (tmp_path / f"wd-{name}").exists()
        assert not (tmp_path / f"wd-{name}.importing").exists()


def test_nan_and_inf_weights_are_refused_naming_the_tensor(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path / "nan")
    tensors = load_file(d / "model.safetensors")
    tensors[UP][3, 5] = np.nan
    tensors["model.norm.weight"][0] = np.inf
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    message = refused(import_hf, d, tmp_path / "wd")
    assert "NaN or Inf" in message and "(and 1 more)" in message, message
    assert UP in message or "model.norm.weight" in message, message
    assert not (tmp_path / "wd").exists()


def test_malformed_index_and_shards_outside_the_directory(llama_dir, tmp_path):
    names = list(load_file(llama_dir / "model.safetensors"))
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.copy(llama_dir / "model.safetensors", outside / "model.safetensors")
    cases = {
        "list": ([["model.safetensors"]], "weight_map is not an object"),
        "number": ({n: 42 for n in names}, "maps to 42"),
        "parent": ({n: "../other/model.safetensors" for n in names}, "outside the model directory"),
        "absolute": ({n: str(outside / "model.safetensors") for n in names},
                     "outside the model directory"),
    }
    for name, (weight_map, needle) in cases.items():
        d = copy(llama_dir, tmp_path / name)
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        message = refused(import_hf, d, tmp_path / f"wd-{name}")
        assert needle in message, (name, message)
    d = copy(llama_dir, tmp_path / "torn")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    assert "cannot read" in refused(import_hf, d, tmp_path / "wd-torn")


def test_a_fifo_in_the_checkpoint_and_a_bad_index_via_init_from_are_one_line(llama_dir, tmp_path):
    fifo = copy(llama_dir, tmp_path / "fifo")
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")  # reading it would block forever
    p = cli("hf", "import", str(fifo), "--workdir", str(tmp_path / "wd"), timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr
    assert p.stderr.strip().count("\n") == 0 and "not a regular file" in p.stderr, p.stderr
    assert not (tmp_path / "wd").exists()

    bad = copy(llama_dir, tmp_path / "index")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    p = cli("train", "--config", "experiments/lm.py:smoke", "--workdir", str(tmp_path / "run"),
            f"--config.init.from={bad}", "--config.train.steps=2", timeout=300)
    assert p.returncode == 2 and "weight_map is not an object" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_an_unparsable_chat_template_is_refused_at_import(llama_dir, tmp_path):
    d = copy(llama_dir, tmp_path / "template")
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "chat_template": "{% for m in messages %}{{ m"}))
    message = refused(import_hf, d, tmp_path / "wd")
    assert "does not parse" in message and "chat_template" in message, message
    assert not (tmp_path / "wd").exists()


def test_no_tokenizer_warns_that_text_will_be_bytes(llama_dir, tmp_path, caplog):
    d = copy(llama_dir, tmp_path / "notok")
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with caplog.at_level(logging.WARNING, logger="infra.interop.importer"):
        workdir = import_hf(d, tmp_path / "wd")
    warning = [r.getMessage() for r in caplog.records if "no tokenizer.json" in r.getMessage()]
    assert warning and "320 tokens" in warning[0] and "tokenizer.json" in warning[0], caplog.text
    assert (workdir / "checkpoints" / "0").is_dir()


# --- the import's target --------------------------------------------------------------------------

def test_the_workdir_must_be_a_new_directory(llama_dir, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("mine")
    assert "is a file" in refused(import_hf, llama_dir, file)
    assert file.read_text() == "mine"
    under_file = file / "wd"  # a file where the parent directory must be
    assert "cannot write" in refused(import_hf, llama_dir, under_file)


def test_someone_elses_staging_directory_is_refused_and_kept(llama_dir, tmp_path):
    staging = tmp_path / "wd.importing"
    staging.mkdir()
    (staging / "notes.txt").write_text("not yours")
    message = refused(import_hf, llama_dir, tmp_path / "wd")
    assert "was not made by `hf import`" in message, message
    assert (staging / "notes.txt").read_text() == "not yours"
    assert not (tmp_path / "wd").exists()


def test_a_stale_staging_directory_of_an_interrupted_import_is_replaced(llama_dir, tmp_path):
    staging = tmp_path / "wd.importing"
    staging.mkdir()
    (staging / MARKER).write_text(json.dumps({"pid": 1, "host": "gone", "since": "then"}))
    (staging / "half-written").write_text("x")
    workdir = import_hf(llama_dir, tmp_path / "wd")
    assert (workdir / "config.json").is_file() and not staging.exists()
    assert not (workdir / MARKER).exists() and not (workdir / "half-written").exists()


def test_a_second_import_into_the_same_workdir_stops_naming_the_holder(llama_dir, tmp_path):
    """The first import holds the staging directory's lock (taken here as the first import's
    process would); the second stops at once and deletes none of the first's files."""
    staging = tmp_path / "wd.importing"
    staging.mkdir()
    (staging / "state-being-written").write_text("the winner's")
    with open(staging / MARKER, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(json.dumps({"pid": 4242, "host": "node-7", "since": "2026-12-06T10:00:00"}))
        held.flush()
        message = refused(import_hf, llama_dir, tmp_path / "wd")
    assert "being written by another `hf import` (pid 4242 on node-7" in message, message
    assert (staging / "state-being-written").read_text() == "the winner's"
    assert not (tmp_path / "wd").exists()


def test_import_on_a_full_disk_is_exit_3_and_leaves_nothing(llama_dir, mount):
    small = mount("small", "size=2M")
    fill(small, 64 * 1024)
    message = refused(import_hf, llama_dir, small / "wd", code=3)
    assert "free disk space" in message and "--workdir" in message, message
    assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_import_into_a_read_only_filesystem_is_exit_2(llama_dir, mount):
    ro = mount("ro", "ro,size=1M")
    message = refused(import_hf, llama_dir, ro / "wd")
    assert "cannot write" in message and "writable" in message, message


# --- export -------------------------------------------------------------------------------------

def test_export_refuses_targets_inside_the_run_and_bad_shard_sizes(imported, tmp_path):
    before = tree(imported)
    for out in (imported / "export", imported / "checkpoints" / "99", imported):
        assert "inside the run's workdir" in refused(export_hf, imported, out)
    for size in (0, -5):
        assert "--max_shard_size must be positive" in refused(
            export_hf, imported, tmp_path / f"out{size}", max_shard_size=size)
    file = tmp_path / "a-file"
    file.write_text("mine")
    assert "is a file" in refused(export_hf, imported, file)
    assert tree(imported) == before and file.read_text() == "mine"


def test_export_of_a_non_language_model_run_speaks_of_export(imported, tmp_path):
    other = copy(imported, tmp_path / "forecast")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "task": "forecast"}))
    message = refused(export_hf, other, tmp_path / "out")
    assert message.startswith("hf export needs a language-model run"), message


def test_export_staging_of_someone_else_is_kept_and_stale_one_replaced(imported, tmp_path):
    staging = tmp_path / "out.exporting"
    staging.mkdir()
    (staging / "notes.txt").write_text("not yours")
    assert "was not made by `hf export`" in refused(export_hf, imported, tmp_path / "out")
    assert (staging / "notes.txt").read_text() == "not yours"
    (staging / "notes.txt").unlink()
    (staging / MARKER).write_text("{}")
    out = export_hf(imported, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and not staging.exists()
    assert not (out / MARKER).exists()


def test_export_to_a_full_disk_is_exit_3_and_to_read_only_exit_2(imported, mount):
    small = mount("small", "size=2M")
    fill(small, 32 * 1024)
    message = refused(export_hf, imported, small / "out", code=3)
    assert "free disk space or use another --out" in message, message
    assert sorted(p.name for p in small.iterdir()) == ["filler"]
    ro = mount("ro", "ro,size=1M")
    message = refused(export_hf, imported, ro / "out")
    assert "cannot write" in message and "--out" in message, message
