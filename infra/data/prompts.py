"""Prompts to sample from (RL): JSONL records with `prompt` (text) or `messages` (a chat ending
with the user's turn), plus any other fields a reward function reads (`answer`, say).

A prompt is tokenised as fine-tuning tokenised its prompt part (`infra.data.sft.encode`): the
tokenizer's prefix (BOS or nothing) and the text, or the chat template with the generation
prompt; so an SFT model sees in RL exactly the prompts it was taught to answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from infra.data.chat import prompt_ids
from infra.data.sft import Record
from infra.errors import DataError

PROMPT_KEYS = ("prompt", "messages", "completion")


def prompt_of(record: dict):
    """The prompt a reward function receives: the text, or the messages."""
    return record["messages"] if "messages" in record else record["prompt"]


def encode(records: Sequence[Record], tokenizer, template: str | None = None
           ) -> list[np.ndarray]:
    """The token ids of each record's prompt (int32)."""
    out = []
    plain = [i for i, (_, _, r) in enumerate(records) if "messages" not in r]
    texts = [records[i][2]["prompt"] for i in plain]
    ids = (tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch")
           else [tokenizer.encode(t) for t in texts])
    by_index = {i: np.concatenate([list(tokenizer.prefix_ids), x]).astype(np.int32)
                for i, x in zip(plain, ids)}
    for i, (path, number, record) in enumerate(records):
        if i in by_index:
            out.append(by_index[i])
            continue
        try:
            out.append(np.asarray(prompt_ids(tokenizer, record["messages"], template), np.int32))
        except DataError as e:
            raise DataError(f"{path}:{number}: {e}") from None
    return out


def columns(records: Sequence[dict]) -> dict[str, list]:
    """Every field of the records but the prompt / completion, as lists aligned with them
    (None where a record lacks it): the `**example` a reward function is called with."""
    keys = sorted({k for r in records for k in r if k not in PROMPT_KEYS})
    return {k: [r.get(k) for r in records] for k in keys}
