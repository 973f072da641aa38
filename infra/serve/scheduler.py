"""The host loop: admit queued requests into free slots while the others decode (continuous
batching), stream each token's text as it is produced, free a slot at EOS, a stop string,
`max_tokens`, a full context, or cancellation.

One thread owns the engine (`Scheduler.start()`), or a caller drives it (`run_until_idle()`:
what `generate` and the tests do). Other threads only `submit` and `cancel`, under a lock.
Each request reports through its `emit(event)` callback, called on the loop's thread: the
server turns that into an asyncio queue per request.

`static=True` is the baseline the benchmark compares against: a batch is admitted only when
every slot is free and runs until its last request finishes.

What each token adds to the text, and where a stop string ends it, is `infra.serve.output`'s
(incremental detokenization, stop strings never sent, no partial character).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable

import numpy as np

from infra.serve.engine import Engine, SamplingParams
from infra.serve.output import Detokenizer, find_stop, sendable_end

_ids = itertools.count()


class QueueFull(Exception):
    """The bounded queue is full: the server answers 429."""


class Draining(Exception):
    """The server is shutting down and takes no new requests: 503."""


@dataclasses.dataclass
class Token:
    text: str  # new text (may be "" while bytes of a character or a stop string are held back)
    token_id: int
    count: int = 0  # completion tokens produced so far (the text covers at most these)


@dataclasses.dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string), "length" (max_tokens, context), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. `ids`: the prompt as token ids (the tokenizer's BOS included); `emit` receives Token
    events then one Finished, on the scheduler's thread."""

    ids: np.ndarray
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate past EOS (benchmarks that need exact output lengths)
    top_logprobs: int = 0  # alternatives kept per token (<= engine.TOP_LOGPROBS), in `top`
    score_prompt: bool = False  # the prompt's own log-probabilities, in `prompt_scores`
    adapter: int = 0  # which of the engine's stacked LoRA adapters (0: the served workdir's)
    emit: Callable[[object], None] = lambda event: None
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    # filled in by the scheduler
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    detokenizer: Detokenizer | None = None  # the completion's token ids and text
    # log-probability of each of `token_ids` under the model (RL learners, OpenAI logprobs)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # per token of `token_ids`: the `top_logprobs` likeliest (ids, log-probabilities)
    top: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    # (log-probability of ids[1:], top ids, top log-probabilities) when `score_prompt`
    prompt_scores: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    sent: int = 0  # characters of the decoded text already emitted
    resume_ids: np.ndarray | None = None  # preempted: prompt + generated, to prefill again
    preemptions: int = 0
    finished: Finished | None = None
    cancelled: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.detokenizer.ids if self.detokenizer is not None else []


class Metrics:
    """Hooks the scheduler calls (the server's Prometheus collector overrides them)."""

    def ttft(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, request: Request) -> None: ...


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, *, max_queue: int = 64, static: bool = False,
                 metrics: Metrics | None = None):
        self.engine, self.tok = engine, tokenizer
        self.max_queue, self.static = max_queue, static
        self.metrics = metrics or Metrics()
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * engine.slots
        self.order: list[int] = []  # busy slots, oldest admission first
        self.accepting = True
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # --- other threads ------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Request]:
        """Queue all of `requests` (the choices of one API call) or none of them."""
        with self._cv:
            if not self.accepting:
                raise Draining("the server is shutting down")
            if len(self.queue) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting")
            now = time.perf_counter()
            for request in requests:
                request.arrived = now
                self.queue.append(request)
            self._cv.notify()
        return requests

    def cancel(self, request: Request) -> None:
        """Stop `request` (a client went away): its slot is freed before the next step."""
        with self._cv:
            request.cancelled = True
            self._cv.notify()

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.slots)

    def idle(self) -> bool:
        with self._cv:
            return not self.queue and self.busy == 0

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="infra-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self.queue and self.busy == 0:
                        self._cv.wait()
                    if self._stop:
                        break
                self.step()
        except BaseException as e:  # noqa: BLE001 - reported by /health and to every waiter
            self.error = e
            for r in [*self.slots, *self.queue]:
                if r is not None and r.finished is None:
                    self._finish(r, "error")
            raise

    # --- the loop's own thread ------------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Drive the loop in this thread until nothing is queued or running."""
        while not self.idle():
            self.step()

    def step(self) -> None:
        """Cancellations; admissions (pages for the queued prompts that fit); prompt chunks
        up to one chunk's worth of tokens; then, if any slot decodes, pages for the next
        tokens (preempting the newest requests when there are none) and one decode step."""
        for s, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._free(s, "cancelled")
        self._admit()
        self._prefill()
        if not self.engine.decoding.any():
            return
        self._grow()
        tokens, logprobs = self.engine.step()
        now = time.perf_counter()
        top = None
        if any(r is not None and r.top_logprobs for r in self.slots):
            top = self.engine.top_logprobs()
        for s, r in enumerate(self.slots):
            if r is not None and self.engine.decoding[s]:
                self._take(s, r, int(tokens[s]), float(logprobs[s]),
                           None if top is None else (top[0][s], top[1][s]), now)

    def _admit(self) -> None:
        if self.static and self.busy:
            return  # static batching: the running batch finishes first
        for s in range(len(self.slots)):
            if self.slots[s] is not None:
                continue
            with self._cv:
                request = None
                while self.queue and request is None:
                    request = self.queue.popleft()
                    if request.cancelled:  # gone before it started
                        self._finish(request, "cancelled")
                        request = None
                if request is None:
                    return
                resumed = request.resume_ids is not None
                ids = request.resume_ids if resumed else request.ids
                if not self.engine.admit(s, ids, request.sampling, adapter=request.adapter,
                                         score_prompt=request.score_prompt and not resumed):
                    self.queue.appendleft(request)  # waits for pages to be released
                    return
            self.slots[s] = request
            self.order.append(s)

    def _prefill(self) -> None:
        """Prompt chunks, oldest admission first, up to `prefill_chunk` tokens in all (at least
        one call): a long prompt is prefilled over several steps, decoding goes on between;
        short prompts go through together (`Engine.prefill_group`)."""
        budget = self.engine.prefill_chunk
        while budget > 0 and (group := self.engine.prefill_group(self.order)):
            budget -= sum(min(self.engine.prompt_left(s), self.engine.prefill_chunk)
                          for s in group)
            for row, (s, out) in enumerate(zip(group, self.engine.prefill(group))):
                if out is not None:
                    self._first(s, self.slots[s], row, *out)

    def _first(self, s: int, request: Request, row: int, first: int, logprob: float) -> None:
        """The prefill of `request` in slot `s` (row `row` of the prefill call) finished with
        token `first`."""
        if request.resume_ids is not None:  # after a preemption: the next token, as decoded
            request.resume_ids = None
        elif request.score_prompt:
            request.prompt_scores = self.engine.prompt_logprobs(s)
        if request.max_tokens == 0:  # the prompt's scores only (`echo`)
            self._free(s, "length")
            return
        top = self.engine.top_logprobs() if request.top_logprobs else None
        self._take(s, request, first, logprob,
                   None if top is None else (top[0][row], top[1][row]), time.perf_counter())

    def _grow(self) -> None:
        """A page for every decoding slot's next token; while there is none, the newest
        decoding request is preempted: its pages are freed and it goes back to the front of
        the queue, to be prefilled again with what it has generated (the same tokens follow:
        a token's sampling key depends only on the seed and its position)."""
        while self.engine.grow():
            victim = next(s for s in reversed(self.order) if self.engine.decoding[s])
            r = self._vacate(victim)
            r.resume_ids = np.concatenate([r.ids, np.asarray(r.token_ids, np.int32)])
            r.preemptions += 1
            with self._cv:
                self.queue.appendleft(r)

    def _take(self, s: int, r: Request, token: int, logprob: float,
              top: tuple[np.ndarray, np.ndarray] | None, now: float) -> None:
        """Token `token` (of log-probability `logprob`, likeliest alternatives `top`) was
        produced for request `r` in slot `s`."""
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.ttft(now - r.arrived)
        else:
            self.metrics.inter_token(now - r.last_token_at)
        r.last_token_at = now
        if r.detokenizer is None:
            r.detokenizer = Detokenizer(self.tok)
        out = r.detokenizer
        r.logprobs.append(logprob)
        if r.top_logprobs:
            r.top.append((top[0][:r.top_logprobs], top[1][:r.top_logprobs]))
        if token == self.tok.eos_id and not r.ignore_eos:
            out.ids.append(token)
            self._free(s, "stop", out.full_text(-1))
            return
        out.add(token)
        at = find_stop(out.text, r.stop, r.sent)
        if at >= 0:
            self._free(s, "stop", out.text[:at])
            return
        position = len(r.ids) + len(out.ids) - 1  # of this token
        if len(out.ids) >= r.max_tokens or position >= self.engine.max_len - 1:
            self._free(s, "length", out.full_text())
            return
        self._send(r, out.text[:sendable_end(out.text, r.stop)])

    def _send(self, r: Request, text: str) -> None:
        delta = text[r.sent:]
        r.sent = max(r.sent, len(text))
        r.emit(Token(delta, r.token_ids[-1] if r.token_ids else -1, len(r.token_ids)))

    def _vacate(self, s: int) -> Request:
        """Slot `s` is free again (its pages released); returns the request it held."""
        r = self.slots[s]
        self.slots[s] = None
        self.order.remove(s)
        self.engine.release(s)
        return r

    def _free(self, s: int, reason: str, text: str | None = None) -> None:
        self._finish(self._vacate(s), reason, text)

    def _finish(self, r: Request, reason: str, text: str | None = None) -> None:
        """Send what was held back of the final `text` (None: nothing more), then Finished."""
        if text is not None and len(text) > r.sent:
            self._send(r, text)
        sent = r.detokenizer.full_text()[: r.sent] if r.detokenizer is not None else ""
        r.finished = Finished(reason, len(r.ids), len(r.token_ids),
                              text if text is not None else sent)
        self.metrics.finished(r)
        r.emit(r.finished)
