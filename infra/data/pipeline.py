"""grain pipelines that turn a packed token array into language-modelling batches."""
from __future__ import annotations

import grain
import numpy as np

from infra.errors import ConfigError, DataError


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


def _local_batch(global_batch_size: int, seq_len: int, process_count: int) -> int:
    if seq_len <= 0 or global_batch_size <= 0:
        raise ConfigError(f"data.seq_len and train.batch_size must be positive, got "
                          f"{seq_len} and {global_batch_size}")
    if global_batch_size % process_count:
        raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by the "
                          f"{process_count} JAX processes; pick a multiple of {process_count}")
    return global_batch_size // process_count


def _check_size(source: TokenWindows, global_batch_size: int, what: str) -> None:
    if len(source) < global_batch_size:
        need = global_batch_size * source.seq_len + 1
        raise DataError(
            f"{what} data has {len(source.tokens)} tokens but one global batch needs {need} "
            f"(train.batch_size={global_batch_size} × data.seq_len={source.seq_len} + 1); "
            "add more files to data.files or lower data.seq_len / train.batch_size")


def _shuffle_seed(seed: int) -> int:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"train.seed must be a non-negative integer, got {seed}; "
                          "set --config.train.seed=0")
    # grain reshuffles epoch e with (seed + e); spread user seeds apart so seed s+1's
    # first epoch is not seed s's second.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def train_iterator(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   start_step: int = 0) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of this process's training batches.

    Windows are shuffled from `seed` (a new order each epoch), repeated forever, then
    process `p` takes elements `p::process_count` of that stream and batches them, so the
    processes' batches at step `s` together form global batch `s` of a 1-process run.
    Items: `{"inputs", "targets"}`, int32 `[global_batch_size // process_count, seq_len]`.
    """
    local = _local_batch(global_batch_size, seq_len, process_count)
    source = TokenWindows(tokens, seq_len)
    _check_size(source, global_batch_size, "training")
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=_shuffle_seed(seed))
          .repeat()  # ShuffleMapDataset reseeds per epoch: each epoch has its own order
          [process_index::process_count]
          .batch(local, drop_remainder=True))
    it = iter(ds.to_iter_dataset())
    if start_step:
        # One local batch per step on every process, so global step s is local batch s for any
        # process count: this is how a run resumes on a different number of processes.
        it.set_state({"next_index": int(start_step)})
    return it


def eval_batches(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed evaluation batches: the first `num_batches * global_batch_size` windows in order
    (wrapping around if fewer); process `p` gets rows `p*local:(p+1)*local` of each batch."""
    local = _local_batch(global_batch_size, seq_len, process_count)
    if num_batches < 1:
        raise ConfigError(f"data.eval_batches must be > 0, got {num_batches}; "
                          "set --config.data.eval_batches=<positive>")
    source = TokenWindows(tokens, seq_len)
    if len(source) == 0:
        raise DataError(f"validation data has {len(tokens)} tokens but one window needs "
                        f"{seq_len + 1}; add more files to data.files, raise "
                        "data.val_fraction or lower data.seq_len")
    batches = []
    for b in range(num_batches):
        start = b * global_batch_size + process_index * local
        rows = [source[i % len(source)] for i in range(start, start + local)]
        batches.append({k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets")})
    return batches
