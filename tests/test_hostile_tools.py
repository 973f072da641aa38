"""Hostile input to the tools beside training (`tokenizer train`, `tokenize`, `goodput`) and to a
training run refused after its workdir exists: one `error: ` line naming the problem and the fix
in the command's own flags, exit 2 (exit 3 for a full disk), no traceback, nothing left behind
and nothing of the user's overwritten.

Most cases call the command's function in-process (`run_*_cli` with the arguments the parser
would give; the CLI prints `error: ` + `cli_message()` and exits with `exit_code`); a few run the
real CLI where the command line itself is what is tested.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from infra import goodput
from infra.data import token_file
from infra.data.text import default_corpus_files
from infra.data.tokenizer_cli import run_tokenize_cli, run_train_cli
from infra.errors import UserError
from infra.events import EventLog
from tests.helpers import cli, fill

FILES = default_corpus_files()[:40]
SOME = ",".join(FILES[:5])


def refusal(fn, *args, **kwargs) -> tuple[int, str]:
    """(exit code, stderr line) of a command function that must refuse."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return info.value.exit_code, f"error: {info.value.cli_message()}"


def train_args(out, **kw) -> argparse.Namespace:
    """`tokenizer train` arguments as the parser gives them."""
    return argparse.Namespace(**{"files": SOME, "vocab_size": 300, "min_frequency": 2,
                                 "out": str(out), "overwrite": False, **kw})


def tokenize_args(out, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"files": SOME, "tokenizer": "", "out": str(out), "workers": 1,
                                 "val_fraction": 0.05, "seed": 0, **kw})


def tree(path: Path) -> dict[str, str]:
    """Relative path -> sha256 (directories: "dir") of everything under `path`."""
    return {str(p.relative_to(path)):
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def one_error_line(p: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()
             and not line.lstrip("\r").startswith("tokenizing")]
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and p.returncode == code, (p.returncode, p.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# tokenizer train --------------------------------------------------------------------------------

def test_tokenizer_train_refuses_before_any_work(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "new" / "tok.json"
    cases = [
        (dict(files=f"{FILES[0]},{binary}"), "is not UTF-8 text"),  # used to be a traceback
        (dict(vocab_size=1_000_000_000), "--vocab_size must be at most 2,097,152"),  # an abort
        (dict(vocab_size=100), "--vocab_size must be at least 259"),
        (dict(min_frequency=-1), "--min_frequency must be a count from 0"),
        (dict(files=str(tmp_path / "nothing*.txt")), "--files matched no files"),
    ]
    for kw, needle in cases:
        code, line = refusal(run_train_cli, train_args(out, **kw))
        assert code == 2 and needle in line, line
        assert "--config" not in line, line  # its own flags, not train's
    assert not (tmp_path / "new").exists()  # nothing written, not even the directory


def test_tokenizer_train_says_what_it_wrote_and_overwrites_nothing(tmp_path, capsys):
    out = tmp_path / "tok.json"
    run_train_cli(train_args(out, vocab_size=70_000))
    said = capsys.readouterr().out
    size = Tokenizer.from_file(str(out)).get_vocab_size()
    assert f"trained a {size:,}-token" in said and "fewer than the 70,000 asked for" in said
    assert str(out) in said and str(tmp_path / "tokenizer_config.json") in said
    before = tree(tmp_path)
    for target in (out, tmp_path / "other.json"):  # the file itself, or the config beside it
        code, line = refusal(run_train_cli, train_args(target))
        assert code == 2 and "already exist" in line and "--overwrite" in line, line
    assert tree(tmp_path) == before
    run_train_cli(train_args(out, overwrite=True))
    assert Tokenizer.from_file(str(out)).get_vocab_size() == 300
    assert "trained a 300-token" in capsys.readouterr().out


def test_tokenizer_train_output_that_cannot_be_written(tmp_path, mount):
    (tmp_path / "plainfile").write_text("not a directory\n")
    code, line = refusal(run_train_cli, train_args(tmp_path / "plainfile" / "x" / "tok.json"))
    assert code == 2 and "Not a directory" in line and "--out" in line, line
    (tmp_path / "adir" / "tokenizer.json").mkdir(parents=True)
    code, line = refusal(run_train_cli, train_args(tmp_path / "adir"))
    assert code == 2 and "is a directory" in line, line

    ro = mount("ro", "ro,size=64k")
    code, line = refusal(run_train_cli, train_args(ro / "tok.json"))
    assert code == 2 and "Read-only file system" in line and "--out" in line, line
    small = mount("small", "size=64k")
    filler = fill(small, 4096)
    code, line = refusal(run_train_cli, train_args(small / "sub" / "tok.json"))
    assert code == 3 and "No space left" in line and "free disk space" in line, line
    assert sorted(p.name for p in small.iterdir()) == ["filler"]  # no partial file, no directory
    filler.unlink()


def test_tokenizer_train_cli(tmp_path):
    """The command line: a binary file is one line (it was a traceback); --overwrite exists."""
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    p = cli("tokenizer", "train", "--files", str(binary), "--out", str(tmp_path / "t" / "tok.json"))
    one_error_line(p, 2, "is not UTF-8 text", "--files")
    assert not (tmp_path / "t").exists()
    (tmp_path / "tok.json").write_text("mine")
    p = cli("tokenizer", "train", "--files", SOME, "--vocab_size", "300", "--out",
            str(tmp_path / "tok.json"), "--overwrite")
    assert p.returncode == 0 and "300-token" in p.stdout, p.stderr


# tokenize ---------------------------------------------------------------------------------------

def test_tokenize_refuses_bad_input_in_its_own_flags(tmp_path):
    (tmp_path / "plainfile").write_text("mine\n")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    out = tmp_path / "out"
    cases = [
        (dict(out=str(tmp_path / "plainfile")), f"--out '{tmp_path / 'plainfile'}' is a file"),
        (dict(out=str(tmp_path / "plainfile" / "sub")), "Not a directory"),
        (dict(files=str(tmp_path / "dangling.txt")), "cannot read data file"),  # a traceback
        (dict(files=str(tmp_path / "nothing*.txt")), "--files matched no files"),
        (dict(tokenizer=str(tmp_path / "nothing")), "set --tokenizer="),
        (dict(workers=-1), "--workers must be 0"),
    ]
    for kw, needle in cases:
        code, line = refusal(run_tokenize_cli, tokenize_args(kw.pop("out", out), **kw))
        assert code == 2 and needle in line, line
        assert "--config" not in line and "data.files" not in line, line
    assert not out.exists() and (tmp_path / "plainfile").read_text() == "mine\n"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.bin").write_text("mine\n")
    code, line = refusal(run_tokenize_cli, tokenize_args(tmp_path / "mine"))
    assert code == 2 and "holds files that tokenize did not write" in line, line
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["train.bin"]


def test_tokenize_full_disk_keeps_finished_chunks_and_resumes(tmp_path, mount):
    kwargs = dict(workers=1, chunk_bytes=64 * 1024, progress=False)
    clean = token_file.build_token_dir(FILES, "", tmp_path / "clean", **kwargs)
    small = mount("small", "size=8m")
    filler = fill(small, 1 << 20)
    code, line = refusal(token_file.build_token_dir, FILES, "", small / "tok", **kwargs)
    assert code == 3 and "No space left" in line and "run the same command to resume" in line
    left = [p.name for p in (small / "tok").rglob("*")]
    assert left and not [n for n in left if n.endswith(".tmp")], left  # no half-written file
    assert not (small / "tok" / token_file.INDEX).exists()
    filler.unlink()
    resumed = token_file.build_token_dir(FILES, "", small / "tok", **kwargs)
    assert resumed["splits"] == clean["splits"]
    for split in ("train", "val"):
        assert (small / "tok" / f"{split}.bin").read_bytes() == \
            (tmp_path / "clean" / f"{split}.bin").read_bytes()

    ro = mount("ro", "ro,size=64k")
    code, line = refusal(token_file.build_token_dir, FILES, "", ro / "tok", **kwargs)
    assert code == 2 and "Read-only file system" in line and "--out" in line, line


def test_tokenize_full_disk_cli_is_one_line_and_leaves_nothing(mount):
    """It was a traceback (`OSError: N requested and M written`, no errno) and a partial file."""
    small = mount("small", "size=256k")
    p = cli("tokenize", "--files", ",".join(FILES), "--out", str(small / "tok"), "--workers", "1")
    one_error_line(p, 3, "No space left on device", "free disk space or use another --out")
    assert list(small.iterdir()) == []  # it created the directory and finished no chunk


def test_tokenize_never_trusts_a_damaged_output(tmp_path):
    kwargs = dict(workers=1, chunk_bytes=64 * 1024, progress=False)
    out = tmp_path / "tok"
    out.mkdir()
    (out / token_file.INDEX).write_text("{not json")
    code, line = refusal(token_file.build_token_dir, FILES[:5], "", out, **kwargs)
    assert code == 2 and "is not an index `tokenize` wrote" in line, line
    (out / token_file.INDEX).unlink()
    (out / "parts").mkdir()
    (out / "parts" / "plan.json").write_text("")  # torn
    code, line = refusal(token_file.build_token_dir, FILES[:5], "", out, **kwargs)
    assert code == 2 and "unfinished tokenization" in line, line

    # A chunk file that does not match its marker is tokenised again, not assembled.
    clean = token_file.build_token_dir(FILES, "", tmp_path / "clean", **kwargs)
    calls = []
    real = token_file._encode_chunk

    def dies_after_three(args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real(args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(token_file, "_encode_chunk", dies_after_three)
        with pytest.raises(KeyboardInterrupt):
            token_file.build_token_dir(FILES, "", tmp_path / "damaged", **kwargs)
        (tmp_path / "damaged" / "parts" / "000001.train.bin").write_bytes(b"\0" * 10)
        calls.clear()
        mp.setattr(token_file, "_encode_chunk", lambda args: calls.append(args[0]) or real(args))
        index = token_file.build_token_dir(FILES, "", tmp_path / "damaged", **kwargs)
    assert calls[0] == 1 and 0 not in calls and 2 not in calls
    assert index["splits"] == clean["splits"]
    assert (tmp_path / "damaged" / "train.bin").read_bytes() == \
        (tmp_path / "clean" / "train.bin").read_bytes()


# goodput ----------------------------------------------------------------------------------------

def _events(workdir: Path, lines: list) -> Path:
    path = workdir / "events" / "process_0.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = [{"time": 0.0, "event": "start", "run": "a"},
        {"time": 2.0, "event": "loop_start", "run": "a"},
        {"time": 6.0, "event": "steps", "run": "a", "first": 1, "last": 4, "seconds": 4.0,
         "input_wait_s": 0.0},
        {"time": 7.0, "event": "exit", "run": "a"}]


def test_goodput_skips_bad_records_and_says_so(tmp_path, caplog):
    bad = [{"time": 3.0, "event": "compile", "run": "a", "seconds": float("nan")},  # -> NaN
           {"time": 4.0, "event": "eval", "run": "a", "seconds": "1"},
           {"time": 5.0, "event": "steps", "run": ["a"], "first": 1, "last": 2, "seconds": 1.0,
            "input_wait_s": 0.0},
           {"time": 5.5, "event": "steps", "run": "a", "first": 1, "last": 10**400,
            "seconds": 1.0, "input_wait_s": 0.0},
           {"time": 5.6, "event": "restore", "run": "a", "step": 0, "seconds": 1e308},
           {"time": 5.7, "event": "eval"},  # no seconds
           {"event": "eval", "seconds": 1.0},  # no time
           "[1, 2]", "garbage", '{"time": 1'
           ]
    path = _events(tmp_path, GOOD[:2] + bad + GOOD[2:])
    with caplog.at_level("WARNING"):
        report = goodput.compute(tmp_path)
    assert report == goodput.compute(_events(tmp_path / "clean", GOOD).parents[1])
    assert f"skipped {len(bad)} unusable records in {path}" in caplog.text
    text = goodput.format_report(report)
    assert "nan" not in text and "inf" not in text


def test_goodput_refuses_what_is_no_event_log(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir-log" / "events" / "process_0.jsonl").mkdir(parents=True)
    _events(tmp_path / "garbage", ["\x00\x01garbage", "not json"])
    cases = [(tmp_path / "missing", "no workdir"), (tmp_path / "afile", "is a file, not a workdir"),
             (tmp_path / "dir-log", "cannot read the event log "
              f"{tmp_path / 'dir-log' / 'events' / 'process_0.jsonl'}: Is a directory"),
             (tmp_path / "garbage", "has no usable record (2 unusable records in")]
    for workdir, needle in cases:
        code, line = refusal(goodput.compute, workdir)
        assert code == 2 and needle in line and "--" not in line, line


def test_goodput_cli_json_is_strict_and_the_warning_is_one_line(tmp_path):
    _events(tmp_path, GOOD + [{"time": 7.5, "event": "eval", "run": "a", "seconds": float("nan")}])
    p = cli("goodput", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    assert json.loads(p.stdout, parse_constant=no_constants)["wall_s"] == 7.0
    assert p.stderr.strip().splitlines() == [
        f"warning: skipped 1 unusable record in {tmp_path / 'events' / 'process_0.jsonl'}"]
    (tmp_path / "events" / "process_0.jsonl").unlink()
    (tmp_path / "events" / "process_0.jsonl").mkdir()
    one_error_line(cli("goodput", str(tmp_path)), 2, "cannot read the event log", "Is a directory")


# a refused training run leaves the workdir as it was (the runs themselves: tests/test_bad_input.py)

def test_events_are_written_only_once_the_run_is_accepted(tmp_path):
    log = EventLog(tmp_path, 0, defer=True)
    log.record("start")
    log.record("restore", step=0, seconds=0.0)
    log.close()  # refused: never accepted
    assert list(tmp_path.iterdir()) == []
    log = EventLog(tmp_path, 0, defer=True)
    log.record("start")
    log.accept()
    log.record("exit", reason="finished")
    log.close()
    assert [json.loads(x)["event"] for x in log.path.read_text().splitlines()] == ["start", "exit"]
