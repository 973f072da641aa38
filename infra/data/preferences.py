"""Preference pairs (DPO): JSONL records `{"prompt" | "messages", "chosen", "rejected"}`, the
two completions as text. Each pair becomes two rows (chosen, rejected) of prompt + completion +
EOS (`infra.rl.sequences.completion_rows`), the prompt tokenised as for SFT and GRPO
(`infra.data.prompts`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from infra.data import prompts
from infra.data.sft import Record
from infra.errors import DataError
from infra.rl.sequences import completion_rows


def check(records: Sequence[Record]) -> None:
    """DataError naming the file and line of the first record without string `chosen` and
    `rejected`."""
    for path, number, r in records:
        if not all(isinstance(r.get(k), str) for k in ("chosen", "rejected")):
            raise DataError(f'{path}:{number}: a preference pair needs "chosen" and "rejected" '
                            "strings (the two completions of its prompt)")


def pair_rows(records: Sequence[Record], tokenizer, template: str | None, seq_len: int,
              pad_id: int) -> tuple[dict[str, np.ndarray], int]:
    """(arrays (pairs, 2, seq_len): [:, 0] chosen, [:, 1] rejected; pairs whose prompt and
    longer completion exceed `seq_len` + 1 tokens are left out, and how many)."""
    check(records)
    prompt_ids = prompts.encode(records, tokenizer, template)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    texts = [t for _, _, r in records for t in (r["chosen"], r["rejected"])]
    ids = (tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch")
           else [tokenizer.encode(t) for t in texts])
    done = [np.concatenate([x, eos]).astype(np.int32) for x in ids]
    keep = [i for i, p in enumerate(prompt_ids)
            if len(p) + max(len(done[2 * i]), len(done[2 * i + 1])) <= seq_len + 1]
    flat = completion_rows([prompt_ids[i] for i in keep for _ in (0, 1)],
                           [done[2 * i + k] for i in keep for k in (0, 1)], seq_len, pad_id)
    return {k: v.reshape(len(keep), 2, seq_len) for k, v in flat.items()}, len(records) - len(keep)
