"""Real tokenizers and tokenised corpora: BPE training offline, special tokens from the
tokenizer's config, token files that are deterministic, resumable and read by the LM task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import cli  # noqa: E402

from infra import config as config_lib  # noqa: E402
from infra.data import token_file  # noqa: E402
from infra.data.text import default_corpus_files  # noqa: E402
from infra.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer  # noqa: E402
from infra.errors import DataError  # noqa: E402

FILES = default_corpus_files()[:40]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    """`python -m infra tokenizer train` on 40 stdlib files, vocabulary 512."""
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    files = ",".join(FILES)
    p = cli("tokenizer", "train", "--files", files, "--vocab_size", "512", "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out


def test_trained_tokenizer_round_trips_and_names_its_special_tokens(tok_path):
    tok = load_tokenizer(str(tok_path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) * 0.8
    doc = tok.encode_document(text)
    assert doc[0] == 1 and doc[-1] == 2 and list(doc[1:-1]) == list(ids)
    assert (tok_path.parent / "tokenizer_config.json").is_file()  # BOS / EOS names beside it


def test_special_tokens_follow_the_tokenizer_config(tok_path, tmp_path):
    """A tokenizer config with `bos_token: null` (Qwen) has no BOS; ids from generation_config."""
    d = tmp_path / "qwenlike"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(tok_path.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None,
                                                         "eos_token": "<|eos|>"}))
    tok = HFTokenizer(d)
    assert tok.bos_id is None and tok.eos_id == 2
    assert list(tok.encode_document("hi")[-1:]) == [2]
    (d / "tokenizer_config.json").unlink()
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = HFTokenizer(d)
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_token_dir_is_deterministic_and_resumable(tok_path, tmp_path, monkeypatch):
    kwargs = dict(val_fraction=0.1, seed=0, chunk_bytes=64 * 1024, progress=False)
    one = token_file.build_token_dir(FILES, str(tok_path), tmp_path / "one", workers=1, **kwargs)
    two = token_file.build_token_dir(FILES, str(tok_path), tmp_path / "two", workers=2, **kwargs)
    for split in ("train", "val"):
        a = (tmp_path / "one" / f"{split}.bin").read_bytes()
        assert a == (tmp_path / "two" / f"{split}.bin").read_bytes()
        assert one["splits"][split] == two["splits"][split]
    assert one["dtype"] == "uint16" and one["splits"]["val"]["documents"] == 4

    # A run killed after 3 chunks resumes with the chunks it had finished.
    calls = []
    real = token_file._encode_chunk

    def dies_after_three(args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real(args)

    monkeypatch.setattr(token_file, "_encode_chunk", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        token_file.build_token_dir(FILES, str(tok_path), tmp_path / "resumed", workers=1, **kwargs)
    monkeypatch.setattr(token_file, "_encode_chunk", lambda args: calls.append(args[0]) or real(args))
    token_file.build_token_dir(FILES, str(tok_path), tmp_path / "resumed", workers=1, **kwargs)
    assert calls[:3] == [0, 1, 2] and 0 not in calls[3:] and len(set(calls)) == len(calls)
    for split in ("train", "val"):
        assert (tmp_path / "resumed" / f"{split}.bin").read_bytes() == \
            (tmp_path / "one" / f"{split}.bin").read_bytes()
    # Training with another tokenizer than the files were made with is refused.
    with pytest.raises(DataError, match="was tokenised with"):
        token_file.check_tokenizer(one, "", tmp_path / "one")
    token_file.check_tokenizer(one, str(tok_path), tmp_path / "one")
    # Another tokenizer into the same directory is refused.
    with pytest.raises(DataError, match="another tokenization"):
        token_file.build_token_dir(FILES, "", tmp_path / "one", workers=1, **kwargs)

    # Same documents as tokenising in memory (what the LM task does without data.token_dir).
    index, arrays = token_file.open_token_dir(tmp_path / "one")
    train, val = token_file.tokenize_in_memory(FILES, load_tokenizer(str(tok_path)),
                                               val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(arrays["train"], train)
    np.testing.assert_array_equal(arrays["val"], val)


def test_byte_token_dir_matches_the_byte_corpus(tmp_path):
    from infra.data.text import load_corpus

    token_file.build_token_dir(FILES[:10], "", tmp_path / "bytes", workers=1, val_fraction=0.2,
                               progress=False)
    _, arrays = token_file.open_token_dir(tmp_path / "bytes")
    train, val = load_corpus(FILES[:10], val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(arrays["train"], train)
    np.testing.assert_array_equal(arrays["val"], val)
    assert ByteTokenizer().decode(arrays["val"][:50])


@pytest.mark.slow
def test_lm_trains_on_a_tokenized_corpus(tok_path, tmp_path):
    """`tokenize` (CLI, 2 workers) then training with data.token_dir and the tokenizer; the
    batches are windows of the memory-mapped file and generate decodes with the tokenizer."""
    out = tmp_path / "tokens"
    p = cli("tokenize", "--tokenizer", str(tok_path), "--files", ",".join(FILES), "--out",
            str(out), "--workers", "2")
    assert p.returncode == 0, p.stderr
    assert "tokens/s" in p.stdout
    config = config_lib.load("experiments/lm.py:smoke", {
        "data.token_dir": str(out), "data.tokenizer": str(tok_path), "model.vocab_size": 512,
        "train.steps": 4, "train.eval_every": 4, "train.log_every": 2,
        "train.progress_bar": False, "sharding.print_table": False})
    from infra import train
    from infra.tasks import get_task

    task = get_task(config)
    index, arrays = token_file.open_token_dir(out)
    it = task.train_iterator(0, 1)
    batch = next(it)
    assert batch["inputs"].shape == (16, 64) and batch["inputs"].max() < 512
    assert isinstance(task.corpus[0], np.memmap)
    _, history = train.run(config, tmp_path / "run")
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    assert losses and all(np.isfinite(losses))
    p = cli("generate", "--workdir", str(tmp_path / "run"), "--prompt", "import ", "--json",
            "--max_new_tokens", "5")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout.splitlines()[-1])["token_ids"]) <= 5


def _convention(tok_path: Path, directory: Path, adds_bos: bool) -> Path:
    """The trained tokenizer as a model directory whose tokenizer adds `<|bos|>` before a text
    (Llama 3's convention) or nothing (Qwen's, SmolLM2's: their `bos_token` is not added)."""
    from tokenizers import Tokenizer

    directory.mkdir()
    tok = Tokenizer.from_file(str(tok_path))
    if not adds_bos:
        tok.post_processor = None
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


@pytest.mark.parametrize("adds_bos", [True, False])
def test_prompts_and_documents_follow_the_tokenizers_own_convention(tok_path, tmp_path,
                                                                   adds_bos):
    """A prompt is encoded as transformers encodes the text (BOS only where the tokenizer adds
    it, never twice); a training document starts the same way and ends with EOS; an SFT
    example too; and `generate` / the server sample every special token but padding."""
    import transformers

    from infra.data import sft
    from infra.serve.loading import allowed_ids

    d = _convention(tok_path, tmp_path / ("llama3" if adds_bos else "qwen"), adds_bos)
    ours, theirs = HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    bos = [1] if adds_bos else []
    assert ours.prefix_ids == tuple(bos) and ours.suffix_ids == ()
    for prompt in ("The capital of France is", "def f(x):\n    return x", ""):
        expected = theirs(prompt)["input_ids"]
        assert list(ours.encode_prompt(prompt)) == expected, prompt
        assert list(ours.encode_prompt(np.asarray(expected))) == expected  # ids: not twice
    assert list(ours.encode_prompt("<|bos|>hi")) == [1] + list(ours.encode("hi"))
    assert list(ours.encode_document("hi")) == bos + list(ours.encode("hi")) + [2]
    (tokens, learnt), = sft.encode([("f", 1, {"prompt": "a", "completion": "b"})], ours, None)
    assert list(tokens) == bos + list(ours.encode("a")) + list(ours.encode("b")) + [2]
    assert learnt.sum() == len(ours.encode("b")) + 1
    allowed = allowed_ids(ours, ours.vocab_size + 8)
    assert not allowed[0] and allowed[1] and allowed[2] and not allowed[-1]  # only PAD, padding
