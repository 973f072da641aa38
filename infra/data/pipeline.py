"""Language-modelling batches from a packed token array (windows batched by `infra.data.batching`)."""
from __future__ import annotations

import numpy as np

from infra.data.batching import held_out_batches, local_batch_size, shuffled_batches
from infra.errors import ConfigError, DataError


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"data.seq_len must be a positive integer, got {seq_len}",
                          key="data.seq_len", value="<positive>")


class TokenWindows:
    """Random-access source of non-overlapping windows of `seq_len + 1` tokens.

    Window `i` starts at `i * seq_len`; item `i` is `{"inputs", "targets"}`, int32
    `[seq_len]` each, with targets the inputs shifted by one.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        w = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)
        return {"inputs": w[:-1], "targets": w[1:]}

    def __repr__(self) -> str:
        return f"TokenWindows(tokens={len(self.tokens)}, seq_len={self.seq_len})"


def _check_size(source: TokenWindows, global_batch_size: int, what: str) -> None:
    if len(source) < global_batch_size:
        need = global_batch_size * source.seq_len + 1
        raise DataError(
            f"{what} data has {len(source.tokens)} tokens but one global batch needs {need} "
            f"(train.batch_size={global_batch_size} × data.seq_len={source.seq_len} + 1); "
            "add more files to data.files or lower data.seq_len / train.batch_size")


def train_iterator(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   start_step: int = 0):
    """Endless, checkpointable grain iterator of this process's training batches of shuffled
    windows (see `infra.data.batching.shuffled_batches`).
    Items: `{"inputs", "targets"}`, int32 `[global_batch_size // process_count, seq_len]`.
    """
    _check_seq_len(seq_len)
    source = TokenWindows(tokens, seq_len)
    local_batch_size(global_batch_size, process_count)
    _check_size(source, global_batch_size, "training")
    return shuffled_batches(source, global_batch_size=global_batch_size, seed=seed,
                            process_index=process_index, process_count=process_count,
                            start_step=start_step)


def eval_batches(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed evaluation batches: the first `num_batches * global_batch_size` windows in order
    (wrapping around if fewer); process `p` gets rows `p*local:(p+1)*local` of each batch."""
    _check_seq_len(seq_len)
    local_batch_size(global_batch_size, process_count)
    if num_batches < 1:
        raise ConfigError(f"data.eval_batches must be > 0, got {num_batches}",
                          key="data.eval_batches", value="<positive>")
    source = TokenWindows(tokens, seq_len)
    if len(source) == 0:
        raise DataError(f"validation data has {len(tokens)} tokens but one window needs "
                        f"{seq_len + 1}; add more files to data.files, raise "
                        "data.val_fraction or lower data.seq_len")
    return held_out_batches(source, global_batch_size=global_batch_size,
                            process_index=process_index, process_count=process_count,
                            num_batches=num_batches)
