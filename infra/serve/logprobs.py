"""OpenAI's `logprobs` objects, from the log-probabilities the engine computed for a request
(`Request.logprobs` / `top` for its completion, `prompt_scores` for an echoed prompt).

A choice lists the tokens of its text: an echoed prompt's (the first has no log-probability:
nothing predicts it), then the completion's, up to the last that adds to the text (not a final
EOS or the tokens of a stop string, which the text leaves out). Completions give each token's
alternatives as a `{token: logprob}` dict with the chosen token in it (as vLLM does: up to
`logprobs` + 1 entries) and `text_offset`, the character where each token starts in the
choice's text; chat gives `{token, logprob, bytes, top_logprobs}` per token. Tokens are their
text (special tokens by name; part of a character as `bytes:\\xe2`, so that such tokens stay
apart in a dict); JSON has no -inf, so log-probabilities are floored at -9999 (as
vLLM does).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infra.serve import schemas
from infra.serve.output import Detokenizer
from infra.serve.scheduler import Request

FLOOR = -9999.0


@dataclasses.dataclass
class Entry:
    """One token of a choice's text: its id, log-probability (None: the prompt's first),
    likeliest alternatives (ids, log-probabilities) and character offset in the text."""

    token: int
    logprob: float | None
    top: tuple[np.ndarray, np.ndarray] | None
    offset: int


def _floor(value) -> float:
    return max(float(value), FLOOR)


def prompt_entries(tok, r: Request, k: int) -> list[Entry]:
    """The scored prompt of `r` (`score_prompt`), offsets into the decoded prompt."""
    chosen, ids, values = r.prompt_scores
    detok, out = Detokenizer(tok), []
    for i, token in enumerate(int(t) for t in r.ids):
        scored = i > 0
        out.append(Entry(token, float(chosen[i - 1]) if scored else None,
                         (ids[i - 1, :k], values[i - 1, :k]) if scored else None,
                         len(detok.text)))
        detok.add(token)
    return out


class Completion:
    """The entries of a completion's tokens, taken as the text they make is sent (streaming) or
    once it is whole; offsets start at `base` (the length of an echoed prompt)."""

    def __init__(self, tok, r: Request, base: int = 0):
        self.r, self.base = r, base
        self.detok = Detokenizer(tok)
        self.done = 0  # tokens taken so far

    def take(self, upto: int) -> list[Entry]:
        """Entries of tokens [done, upto)."""
        out = []
        while self.done < upto:
            out.append(self._next())
        return out

    def take_visible(self, text: str) -> list[Entry]:
        """The rest of the tokens that start inside the finished completion `text`."""
        out = []
        while self.done < len(self.r.token_ids) and len(self.detok.text) < len(text):
            out.append(self._next())
        return out

    def _next(self) -> Entry:
        r, i = self.r, self.done
        entry = Entry(r.token_ids[i], r.logprobs[i], r.top[i] if r.top else None,
                      self.base + len(self.detok.text))
        self.detok.add(r.token_ids[i])
        self.done += 1
        return entry


def for_completion(tok, entries: list[Entry], k: int) -> schemas.CompletionLogprobs:
    """`choices[i].logprobs` of `/v1/completions`."""
    tops = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top = {tok.token_text(t): _floor(v) for t, v in zip(*e.top)} if e.top else {}
        top.setdefault(tok.token_text(e.token), _floor(e.logprob))
        tops.append(top)
    return schemas.CompletionLogprobs(
        tokens=[tok.token_text(e.token) for e in entries],
        token_logprobs=[None if e.logprob is None else _floor(e.logprob) for e in entries],
        top_logprobs=tops, text_offset=[e.offset for e in entries])


def for_chat(tok, entries: list[Entry]) -> schemas.ChoiceLogprobs:
    """`choices[i].logprobs` of `/v1/chat/completions` (and of each streamed chunk)."""
    def item(token: int, logprob: float) -> dict:
        return {"token": tok.token_text(token), "logprob": _floor(logprob),
                "bytes": list(tok.token_bytes(token))}

    return schemas.ChoiceLogprobs(content=[schemas.TokenLogprob(
        **item(e.token, e.logprob),
        top_logprobs=[schemas.TopLogprob(**item(int(t), v)) for t, v in zip(*e.top)]
        if e.top else []) for e in entries])
