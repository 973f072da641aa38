"""The response of one API call (`infra.serve.server.Call`): its choices' text, finish reasons,
log-probabilities and usage, as one `Completion` / `ChatCompletion` or as server-sent event
chunks (`infra.serve.schemas`).

Streamed, each choice (`index`) gets a chunk per piece of text, with the log-probabilities of
the tokens that text covers; an echoed prompt comes first, in one chunk with its own; the
finish reason comes in a last chunk per choice, then optionally the usage (of all choices),
then `data: [DONE]`.
"""

from __future__ import annotations

from infra.serve import logprobs, schemas
from infra.serve.scheduler import Finished, Token
from infra.serve.server import Call


def _reason(f: Finished) -> str:
    return f.reason if f.reason in ("stop", "length") else "stop"


class Answer:
    """Builds the answer to `call`; `base` = the response's id, created and model fields."""

    def __init__(self, tok, call: Call, base: dict, chat_api: bool):
        self.tok, self.call, self.base, self.chat_api = tok, call, base, chat_api
        self.k = call.logprobs
        echo = call.echo or [""] * len(call.requests)
        self.echo_text = echo if call.echo is not None else None
        self.completions = [logprobs.Completion(tok, r, len(e))
                            for r, e in zip(call.requests, echo)]
        self.started = [False] * len(call.requests)

    def usage(self) -> schemas.Usage:
        done = sum(r.finished.completion_tokens for r in self.call.requests)
        return schemas.Usage(prompt_tokens=self.call.prompt_tokens, completion_tokens=done,
                             total_tokens=self.call.prompt_tokens + done)

    # --- whole ------------------------------------------------------------------------------------
    def whole(self) -> dict:
        """The response once every choice has finished."""
        choices = []
        for i, r in enumerate(self.call.requests):
            f = r.finished
            entries = self.completions[i].take_visible(f.text) if self.k is not None else []
            if self.chat_api:
                choices.append(schemas.ChatChoice(
                    index=i, message=schemas.AssistantMessage(content=f.text),
                    logprobs=self._chat(entries), finish_reason=_reason(f)))
            else:
                choices.append(schemas.CompletionChoice(
                    index=i, text=(self.echo_text[i] if self.echo_text else "") + f.text,
                    logprobs=self._completion(self._prompt(i) + entries),
                    finish_reason=_reason(f)))
        kind = schemas.ChatCompletion if self.chat_api else schemas.Completion
        return kind(**self.base, choices=choices, usage=self.usage()).model_dump(mode="json")

    # --- streamed -----------------------------------------------------------------------------------
    def opening(self) -> list[str]:
        """Chat: each choice's first chunk (the assistant role)."""
        if not self.chat_api:
            return []
        return [self._chunk(i, schemas.Delta(role="assistant", content=""), None, None)
                for i in range(len(self.call.requests))]

    def event(self, i: int, event: Token | Finished) -> list[str]:
        """The chunks of choice `i`'s scheduler event."""
        out = []
        if not self.started[i]:
            self.started[i] = True
            if self.echo_text is not None:  # the prompt (scored at admission) comes first
                out.append(self._text(i, self.echo_text[i], self._prompt(i), None))
        if isinstance(event, Token):
            if event.text:
                entries = self.completions[i].take(event.count) if self.k is not None else []
                out.append(self._text(i, event.text, entries, None))
            return out
        entries = (self.completions[i].take_visible(event.text) if self.k is not None else [])
        out.append(self._text(i, None, entries, _reason(event)))
        return out

    def closing(self, include_usage: bool) -> list[str]:
        out = []
        if include_usage:
            kind = schemas.ChatCompletionChunk if self.chat_api else schemas.Completion
            out.append(f"data: {kind(**self.base, choices=[], usage=self.usage()).model_dump_json()}\n\n")
        return out + ["data: [DONE]\n\n"]

    # --- pieces ---------------------------------------------------------------------------------
    def _prompt(self, i: int) -> list[logprobs.Entry]:
        r = self.call.requests[i]
        return logprobs.prompt_entries(self.tok, r, self.k) if r.score_prompt else []

    def _completion(self, entries) -> schemas.CompletionLogprobs | None:
        return None if self.k is None else logprobs.for_completion(self.tok, entries, self.k)

    def _chat(self, entries) -> schemas.ChoiceLogprobs | None:
        return None if self.k is None else logprobs.for_chat(self.tok, entries)

    def _text(self, i: int, text: str | None, entries, finish: str | None) -> str:
        if self.chat_api:
            return self._chunk(i, schemas.Delta(content=text), self._chat(entries), finish)
        out = schemas.Completion(**self.base, choices=[schemas.CompletionChoice(
            index=i, text=text or "", logprobs=self._completion(entries),
            finish_reason=finish)])
        return self._sse(out)

    def _chunk(self, i: int, delta: schemas.Delta, lp, finish: str | None) -> str:
        return self._sse(schemas.ChatCompletionChunk(**self.base, choices=[
            schemas.ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)]))

    def _sse(self, out) -> str:
        # `usage` is null in every chunk but the last when the client asked for it, else absent
        exclude = None if self.call.include_usage else {"usage"}
        return f"data: {out.model_dump_json(exclude=exclude)}\n\n"
