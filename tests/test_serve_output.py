"""Incremental detokenization (`infra.serve.output`): after every token the streamed text is the
whole decode of the tokens so far, less a trailing unfinished character, for byte ids, a
byte-level BPE and a Metaspace (SentencePiece-style) tokenizer whose decoder strips a leading
space; stop strings are found and held back as before."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from infra.data.tokenizer import ByteTokenizer, HFTokenizer
from infra.serve.output import Detokenizer, find_stop, sendable_end
from tests import hf_models

TEXT = ["naïve café — 日本語 emoji 🙂 ok", "the quick brown fox jumps over the lazy dog",
        "def f(x):\n    return x ** 2  # ∑ ≤ ∞"]


def metaspace(directory):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=120,
                                                           special_tokens=["<unk>", "</s>"]))
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory)


@pytest.mark.parametrize("kind", ["bytes", "bpe", "metaspace"])
def test_streamed_text_is_the_whole_decode_at_every_token(kind, tmp_path):
    tok = {"bytes": lambda: ByteTokenizer(),
           "bpe": lambda: HFTokenizer(hf_models.train_tokenizer(tmp_path)),
           "metaspace": lambda: metaspace(tmp_path)}[kind]()
    rng = np.random.default_rng(0)
    sequences = [list(tok.encode(t)) for t in TEXT]  # real text, split at every token
    sequences += [list(rng.integers(0, tok.vocab_size, 40)) for _ in range(100)]  # any ids
    for ids in sequences:
        det = Detokenizer(tok)
        for n, token in enumerate(ids, 1):
            det.add(int(token))
            whole = tok.decode(ids[:n])
            assert det.text == whole.rstrip("\ufffd"), (kind, ids[:n])
            assert det.full_text() == whole


def test_stops_are_found_where_they_begin_and_partial_stops_held_back():
    assert find_stop("abc STOP def", ("STOP",), 0) == 4
    assert find_stop("abc STOP def END", ("END", "STOP"), 0) == 4  # the first in the text
    assert find_stop("abcdef", ("xyz",), 0) == -1
    assert sendable_end("hello wo", ("world",)) == len("hello ")  # may grow into the stop
    assert sendable_end("café\ufffd", ()) == len("café")  # an unfinished character
