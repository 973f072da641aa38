"""Tests for infra.data: tokenizer, corpus split, grain iterators, errors."""
import contextlib
import itertools
import json

import numpy as np
import pytest

from infra.data.pipeline import eval_batches, train_iterator
from infra.data.text import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, default_corpus_files,
                             encode, load_corpus, resolve_files)
from infra.errors import ConfigError, DataError


def _write(tmp_path, texts):
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"doc{i:02d}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    return paths


def _rows(batch):
    return [tuple(r) for r in batch["inputs"]]


@contextlib.contextmanager
def _raises(err, match):
    """pytest.raises that also checks the message is one line (the CLI prints it so)."""
    with pytest.raises(err, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def _take(it, n):
    return list(itertools.islice(it, n))


def test_encode_decode_round_trip():
    text = "héllo, 世界 🙂\n"
    ids = encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text
    assert decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == text
    assert VOCAB_SIZE == 259 and decode([0xFF]) == "\ufffd"


def test_packing_and_windows(tmp_path):
    files = _write(tmp_path, ["ab", "cde"])
    train, val = load_corpus(files, val_fraction=0.0, seed=0)
    assert train.dtype == np.uint16 and len(val) == 0
    assert train.tolist() == [BOS_ID, *b"ab", EOS_ID, BOS_ID, *b"cde", EOS_ID]

    tokens = np.arange(1, 42, dtype=np.uint16)  # 41 tokens → 10 windows of seq_len 4
    it = train_iterator(tokens, seq_len=4, global_batch_size=2, seed=0)
    for batch in _take(it, 10):
        assert batch["inputs"].shape == (2, 4) and batch["inputs"].dtype == np.int32
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        np.testing.assert_array_equal(batch["targets"][:, -1], batch["inputs"][:, -1] + 1)
        assert all(r[0] % 4 == 1 for r in batch["inputs"])  # windows start at stride seq_len


def test_split_whole_files(tmp_path):
    files = _write(tmp_path, [f"file number {i}\n" * 5 for i in range(20)])
    train, val = load_corpus(files, val_fraction=0.2, seed=3)
    again = load_corpus(files, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    docs = lambda a: set(decode(a).splitlines())  # noqa: E731
    assert docs(train) and docs(val) and not docs(train) & docs(val)
    assert len(docs(val)) == 4  # about val_fraction of the files
    other = load_corpus(files, val_fraction=0.2, seed=4)[1]
    assert docs(other) != docs(val)  # the held-out files depend on the seed

    (tmp_path / "single").mkdir()
    one = _write(tmp_path / "single", ["0123456789" * 10])
    train1, val1 = load_corpus(one, val_fraction=0.1, seed=0)
    assert decode(train1) + decode(val1) == "0123456789" * 10 and decode(val1) == "0123456789"


def test_default_corpus_splits():
    files = default_corpus_files()
    assert len(files) > 20 and files == sorted(files) and all(f.endswith(".py") for f in files)
    assert resolve_files("") == files
    train, val = load_corpus(files, val_fraction=0.05, seed=0)
    assert len(train) > 10 * len(val) > 0
    assert np.count_nonzero(train == BOS_ID) + np.count_nonzero(val == BOS_ID) <= len(files)
    assert len(eval_batches(val, seq_len=128, global_batch_size=8, num_batches=2)) == 2


def test_resolve_files(tmp_path):
    _write(tmp_path, ["x", "y"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.md").write_text("z")
    assert resolve_files(f"{tmp_path}/**") == sorted(
        [str(tmp_path / "doc00.txt"), str(tmp_path / "doc01.txt"), str(tmp_path / "sub" / "z.md")])
    assert resolve_files(f"{tmp_path}/*.md, {tmp_path}/sub/*.md") == [str(tmp_path / "sub" / "z.md")]


def test_determinism_and_process_sharding():
    tokens = np.arange(64 * 8 + 1, dtype=np.uint16)  # 64 windows of 8
    kw = dict(seq_len=8, global_batch_size=8)
    a = _take(train_iterator(tokens, seed=1, **kw), 5)
    b = _take(train_iterator(tokens, seed=1, **kw), 5)
    c = _take(train_iterator(tokens, seed=2, **kw), 5)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))

    shards = [_take(train_iterator(tokens, seed=1, process_index=p, process_count=2, **kw), 5)
              for p in range(2)]
    for step in range(5):
        p0, p1 = (set(_rows(s[step])) for s in shards)
        assert shards[0][step]["inputs"].shape == (4, 8)
        assert not p0 & p1 and p0 | p1 == set(_rows(a[step]))


def test_checkpoint_resume():
    tokens = np.arange(40 * 16 + 1, dtype=np.uint16)
    make = lambda: train_iterator(tokens, seq_len=16, global_batch_size=4, seed=0,  # noqa: E731
                                  process_index=1, process_count=2)
    it = make()
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)
    expected = _take(it, 2)
    fresh = make()
    fresh.set_state(json.loads(json.dumps(state)))
    for x, y in zip(expected, _take(fresh, 2)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


def test_epochs_reshuffle():
    tokens = np.arange(10 * 4 + 1, dtype=np.uint16)  # 10 windows; 5 batches of 2 per epoch
    it = train_iterator(tokens, seq_len=4, global_batch_size=2, seed=0)
    starts = [r[0] for b in _take(it, 15) for r in _rows(b)]
    epochs = [starts[i:i + 10] for i in range(0, 30, 10)]
    for e in epochs:
        assert sorted(e) == list(range(0, 40, 4))
    assert epochs[0] != epochs[1] != epochs[2]


def test_errors(tmp_path):
    with _raises(DataError, match="matched no files: .*pass an existing glob"):
        resolve_files(str(tmp_path / "nothing*.txt"))

    empty = _write(tmp_path, ["", ""])
    with _raises(DataError, match=r"data files '.*\*\.txt' hold no text"):
        load_corpus(empty, val_fraction=0.1, seed=0, pattern=f"{tmp_path}/*.txt")

    (tmp_path / "adir").mkdir()
    files = resolve_files(str(tmp_path / "adir"))  # a literal directory is kept...
    with _raises(DataError, match="cannot read data file .*adir"):  # ...and reported
        load_corpus(files + empty, val_fraction=0.1, seed=0)

    small = np.arange(50, dtype=np.uint16)
    with _raises(DataError, match=r"has 50 tokens .* needs 257 .*more files.*data\.seq_len"):
        train_iterator(small, seq_len=32, global_batch_size=8, seed=0)
    with _raises(DataError, match="validation data has 50 tokens"):
        eval_batches(small, seq_len=64, global_batch_size=8, num_batches=1)

    with _raises(ConfigError, match="batch_size=6 is not divisible by the 4 JAX processes"):
        train_iterator(np.arange(10_000, dtype=np.uint16), seq_len=8, global_batch_size=6, seed=0,
                       process_index=0, process_count=4)


def test_eval_batches_fixed_and_sharded():
    tokens = np.arange(5 * 4 + 1, dtype=np.uint16)  # 5 windows, fewer than needed: wraps around
    full = eval_batches(tokens, seq_len=4, global_batch_size=4, num_batches=2)
    assert [r[0] for b in full for r in _rows(b)] == [0, 4, 8, 12, 16, 0, 4, 8]
    for p in range(2):
        part = eval_batches(tokens, seq_len=4, global_batch_size=4, num_batches=2,
                            process_index=p, process_count=2)
        for g, b in zip(full, part):
            np.testing.assert_array_equal(b["inputs"], g["inputs"][2 * p:2 * p + 2])


def test_array_source_batches_vectorised_and_sharded_like_one_process():
    """ArraySource batches (gathered a batch at a time): the processes' batches form the global
    batch, an epoch visits every row once, and a resumed iterator continues where it left off."""
    from infra.data.batching import ArraySource, shuffled_batches

    n = 1000
    src = ArraySource({"x": np.random.default_rng(0).random((n, 3), np.float32), "y": np.arange(n)})
    full = shuffled_batches(src, global_batch_size=8, seed=3)
    parts = [shuffled_batches(src, global_batch_size=8, seed=3, process_index=p, process_count=2,
                              mask=True) for p in range(2)]
    seen = []
    for _ in range(300):  # 2.4 epochs
        g, a, b = next(full), next(parts[0]), next(parts[1])
        assert sorted(np.concatenate([a["y"], b["y"]])) == sorted(g["y"])
        assert a["mask"].tolist() == [1.0] * 4 and np.array_equal(g["x"], src.arrays["x"][g["y"]])
        seen.append(g["y"])
    stream = np.concatenate(seen)
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # a new order each epoch
    resumed = shuffled_batches(src, global_batch_size=8, seed=3, start_step=200)
    assert np.array_equal(next(resumed)["y"], seen[200])
