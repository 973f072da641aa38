"""Data pipelines: byte-level text corpus and grain iterators."""
from infra.data.pipeline import TokenWindows, eval_batches, train_iterator
from infra.data.text import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, default_corpus_files,
                             encode, load_corpus, resolve_files)

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "TokenWindows", "decode",
    "default_corpus_files", "encode", "eval_batches", "load_corpus", "resolve_files",
    "train_iterator",
]
