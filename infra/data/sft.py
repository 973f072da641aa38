"""Supervised fine-tuning data: JSONL examples -> token ids with a loss mask -> rows of
`seq_len` tokens, one example per row or several packed into one.

An example is one JSON object per line, either a conversation
`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`
(rendered with the tokenizer's chat template, `infra.data.chat`; the assistant's tokens are
learnt) or `{"prompt": ..., "completion": ...}` (the tokenizer's prefix (BOS or nothing), prompt, completion, EOS, tokenised in
two parts as a prompt is at inference; the completion and EOS are learnt).

Each example of n tokens gives n - 1 (input, target) pairs; `loss_mask` marks the targets that
are learnt. One longer than `seq_len` pairs is cut to its first `seq_len` (`overlong=
"truncate"`) or left out (`"drop"`); one with no learnt target left is left out too. Both are
counted (`Stats`).

Rows (`Rows`, a random-access source for `infra.data.batching`) carry `inputs`, `targets`,
`loss_mask` (float32), `segment_ids` (1, 2, ... per example, 0 on padding) and `positions`
(restarting at 0 in each example). Packing places examples into rows best-fit (each into the
fullest row it still fits, a new row if none) in an order shuffled from the seed: deterministic,
so every process computes the same rows and takes its share of each batch, and the grain
iterator over them checkpoints its position like every other task's. The packing is fixed for
the run; each epoch visits its rows in a new order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from infra.data.chat import ChatEncoder
from infra.errors import DataError

OVERLONG = ("truncate", "drop")


@dataclasses.dataclass
class Stats:
    """What happened to the examples of one split."""

    examples: int = 0  # read
    kept: int = 0
    truncated: int = 0  # longer than seq_len, cut (and kept)
    dropped_overlong: int = 0  # longer than seq_len, left out (overlong="drop")
    dropped_empty: int = 0  # nothing left to learn (e.g. a prompt longer than seq_len)
    tokens: int = 0  # (input, target) pairs kept
    loss_tokens: int = 0  # of which learnt
    rows: int = 0  # rows they occupy (packed or not)
    padding: float = 0.0  # fraction of row positions that are padding
    padding_unpacked: float = 0.0  # the same with one example per row

    def describe(self, split: str, seq_len: int, packed: bool) -> str:
        cut = (f", {self.truncated} truncated to data.seq_len" if self.truncated else "")
        cut += (f", {self.dropped_overlong} longer than data.seq_len dropped"
                if self.dropped_overlong else "")
        cut += (f", {self.dropped_empty} with nothing to learn within data.seq_len dropped"
                if self.dropped_empty else "")
        layout = (f"packed into {self.rows} rows of {seq_len}: padding {self.padding:.1%} "
                  f"(unpacked: {self.padding_unpacked:.1%})" if packed else
                  f"one per row, {self.rows} rows of {seq_len}: padding {self.padding:.1%}")
        return (f"sft {split} data: {self.examples} examples ({self.kept} kept{cut}), "
                f"{self.tokens} tokens of which {self.loss_tokens} learnt; {layout}")


# --------------------------------------------------------------------------- reading


def resolve(pattern: str, key: str) -> list[str]:
    """Comma-separated globs -> sorted files (DataError naming `key` when none match)."""
    import glob

    files: set[str] = set()
    for part in (p.strip() for p in pattern.split(",")):
        if part:
            files.update(m for m in glob.glob(os.path.expanduser(part), recursive=True)
                         if not os.path.isdir(m))
    if not files:
        raise DataError(f"{key} matched no files: {pattern!r}; pass JSONL files (one example "
                        "per line)", key=key, value="'data/train.jsonl'", verb="e.g.")
    return sorted(files)


Record = tuple[str, int, dict]  # (file, line number, the JSON object)


def read_jsonl(files: Sequence[str], completion: bool = True) -> list[Record]:
    """Every non-blank line of `files` as a JSON object with `messages` or `prompt` +
    `completion` (only `prompt` when not `completion`: prompts to sample from); DataError
    naming the file and line of the first that is not."""
    records = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}; pass "
                            "readable UTF-8 JSONL files") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({getattr(e, 'msg', e)}); each "
                                "line must be one JSON object") from None
            keys = ("prompt", "completion") if completion else ("prompt",)
            named = " and ".join(f'"{k}"' for k in keys)
            if not isinstance(record, dict) or not (
                    "messages" in record or all(k in record for k in keys)):
                raise DataError(f'{path}:{number}: expected an object with "messages" or with '
                                f'{named}')
            if "messages" not in record and not all(isinstance(record[k], str) for k in keys):
                raise DataError(f'{path}:{number}: {named} must be strings')
            records.append((path, number, record))
    return records


def encode(records: Sequence[Record], tokenizer,
           chat_template: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32, learnt bool) of every record (see the module docstring)."""
    out: list = [None] * len(records)
    chats = [i for i, (_, _, r) in enumerate(records) if "messages" in r]
    if chats:
        encoder = ChatEncoder(tokenizer, chat_template)
        for i in chats:
            path, number, record = records[i]
            try:
                out[i] = encoder.encode([record["messages"]])[0]
            except DataError as e:
                raise DataError(f"{path}:{number}: {e}") from None
    plain = [i for i, (_, _, r) in enumerate(records) if "messages" not in r]
    if plain:
        texts = [t for i in plain for t in (records[i][2]["prompt"], records[i][2]["completion"])]
        ids = (tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch")
               else [tokenizer.encode(t) for t in texts])
        start = list(tokenizer.prefix_ids)  # the tokenizer's convention: BOS or nothing
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        for k, i in enumerate(plain):
            prompt, completion = ids[2 * k], ids[2 * k + 1]
            tokens = np.concatenate([start, prompt, completion, eos]).astype(np.int32)
            learnt = np.zeros(len(tokens), bool)
            learnt[len(start) + len(prompt):] = True
            out[i] = (tokens, learnt)
    return out


# --------------------------------------------------------------------------- fitting, packing


class Examples:
    """Examples as (input, target) pairs in flat arrays: example i is `inputs[starts[i]:
    starts[i] + lengths[i]]` (and the same of `targets`, `learnt`)."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, learnt: np.ndarray,
                 lengths: np.ndarray):
        self.inputs, self.targets, self.learnt = inputs, targets, learnt
        self.lengths = lengths.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)


def fit(encoded: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
        overlong: str) -> tuple[Examples, Stats]:
    """Cut or drop examples longer than `seq_len` pairs; drop those with nothing to learn."""
    stats = Stats(examples=len(encoded))
    ins, tgts, learnt, lengths = [], [], [], []
    for tokens, mask in encoded:
        n = len(tokens) - 1
        cut = n > seq_len
        if cut:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            tokens, mask, n = tokens[: seq_len + 1], mask[: seq_len + 1], seq_len
        if n < 1 or not mask[1:].any():
            stats.dropped_empty += 1
            continue
        stats.truncated += cut
        ins.append(tokens[:-1])
        tgts.append(tokens[1:])
        learnt.append(mask[1:])
        lengths.append(n)
    stats.kept = len(lengths)
    stats.tokens = int(sum(lengths))
    stats.loss_tokens = int(sum(int(m.sum()) for m in learnt))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return Examples(cat(ins, np.int32), cat(tgts, np.int32), cat(learnt, bool),
                    np.asarray(lengths, np.int64)), stats


def pack(lengths: np.ndarray, seq_len: int, order: np.ndarray) -> list[list[int]]:
    """Best-fit packing of examples (in `order`) into rows of `seq_len`: each example goes into
    the row with the least free space that still holds it, or a new row."""
    rows: list[list[int]] = []
    by_free: list[list[int]] = [[] for _ in range(seq_len + 1)]  # free space -> rows
    has = np.zeros(seq_len + 1, bool)  # by_free[s] is not empty
    for i in order:
        n = int(lengths[i])
        fits = np.flatnonzero(has[n:])
        if len(fits):
            space = n + int(fits[0])
            r = by_free[space].pop()
            has[space] = bool(by_free[space])
        else:
            r, space = len(rows), seq_len
            rows.append([])
        rows[r].append(int(i))
        left = space - n
        if left > 0:
            by_free[left].append(r)
            has[left] = True
    return rows


class Rows:
    """Random-access rows of `seq_len` (items and, for `shuffled_batches`, `rows(indices)`)."""

    def __init__(self, examples: Examples, rows: list[list[int]], seq_len: int, pad_id: int):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.members = rows

    def __len__(self) -> int:
        return len(self.members)

    def padding(self) -> float:
        used = int(self.examples.lengths.sum())
        return 1.0 - used / max(1, len(self.members) * self.seq_len)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        b, t, ex = len(indices), self.seq_len, self.examples
        out = {"inputs": np.full((b, t), self.pad_id, np.int32),
               "targets": np.full((b, t), self.pad_id, np.int32),
               "loss_mask": np.zeros((b, t), np.float32),
               "segment_ids": np.zeros((b, t), np.int32),
               "positions": np.zeros((b, t), np.int32)}
        for row, index in enumerate(np.asarray(indices).reshape(-1)):
            at = 0
            for segment, i in enumerate(self.members[int(index)], 1):
                s, n = ex.starts[i], ex.lengths[i]
                out["inputs"][row, at:at + n] = ex.inputs[s:s + n]
                out["targets"][row, at:at + n] = ex.targets[s:s + n]
                out["loss_mask"][row, at:at + n] = ex.learnt[s:s + n]
                out["segment_ids"][row, at:at + n] = segment
                out["positions"][row, at:at + n] = np.arange(n)
                at += n
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        return {k: v[0] for k, v in self.rows(np.array([index])).items()}


def make_rows(examples: Examples, stats: Stats, *, seq_len: int, packing: bool,
              seed: int | None, pad_id: int) -> Rows:
    """Rows of `examples` (packed in an order shuffled from `seed`; None: in their order);
    fills in `stats`' row count and padding fractions."""
    n = len(examples)
    if packing:
        order = (np.random.default_rng([seed, 0x5F7]).permutation(n) if seed is not None
                 else np.arange(n))
        members = pack(examples.lengths, seq_len, order)
    else:
        members = [[i] for i in range(n)]
    rows = Rows(examples, members, seq_len, pad_id)
    stats.rows = len(rows)
    stats.padding = rows.padding()
    stats.padding_unpacked = 1.0 - int(examples.lengths.sum()) / max(1, n * seq_len)
    return rows


def split_by_hash(records: Sequence[Record], fraction: float,
                  seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held out): about `fraction` of the records, chosen by a hash of their content."""
    train, held = [], []
    for rec in records:
        digest = hashlib.sha256(f"{seed}:".encode() + json.dumps(
            rec[2], sort_keys=True).encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(rec)
    return train, held
