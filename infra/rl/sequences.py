"""Rows a learner scores: a prompt followed by a completion, padded to a fixed length, with the
completion's tokens marked (the only ones whose log-probabilities count)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def completion_rows(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray],
                    seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """inputs / targets / positions / segment_ids (int32) and loss_mask (float32), each
    (len(prompts), seq_len): row i is prompt i + completion i shifted by one (next-token
    targets), `loss_mask` 1 where the target is a completion token, `segment_ids` 0 on padding.
    A row longer than `seq_len` + 1 tokens is cut (its completion's tail is not scored)."""
    n = len(prompts)
    out = {"inputs": np.full((n, seq_len), pad_id, np.int32),
           "targets": np.full((n, seq_len), pad_id, np.int32),
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
           "segment_ids": np.zeros((n, seq_len), np.int32),
           "loss_mask": np.zeros((n, seq_len), np.float32)}
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = np.concatenate([np.asarray(p, np.int32), np.asarray(c, np.int32)])[:seq_len + 1]
        m = len(seq) - 1
        out["inputs"][i, :m] = seq[:-1]
        out["targets"][i, :m] = seq[1:]
        out["segment_ids"][i, :m] = 1
        out["loss_mask"][i, len(p) - 1:m] = 1.0
    return out
