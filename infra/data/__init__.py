"""Data pipelines: generic grain batching, the byte-level text corpus and its windows."""
from infra.data.batching import ArraySource, held_out_batches, shuffled_batches
from infra.data.pipeline import TokenWindows, eval_batches, train_iterator
from infra.data.text import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, default_corpus_files,
                             encode, load_corpus, resolve_files)

__all__ = [
    "ArraySource", "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "TokenWindows", "decode",
    "default_corpus_files", "encode", "eval_batches", "held_out_batches", "load_corpus",
    "resolve_files", "shuffled_batches", "train_iterator",
]
