"""The OpenAI-compatible API's side of the scheduler: a validated request body
(`infra.serve.schemas`) becomes a scheduler `Request` (prompt ids, sampling, stops, length); the
routes that call it live in `infra.serve.routes`.

Nothing a request carries runs on the event loop for long: its body is bounded
(`max_body_bytes`), the chat template renders in `infra.data.template_sandbox`'s worker
processes (bounded in time and memory; awaited from a thread), and tokenization runs in a
thread (the Rust tokenizer releases the GIL), after a prompt too long for any context was
refused by its length alone. With an API key set, the `/v1` routes need `Authorization: Bearer
<key>` (401 otherwise); `/health` and `/metrics` stay open for probes and scrapers.

A call becomes one scheduler request per choice: `n` per prompt (completions take several
prompts; choice `index` = prompt * n + j), each with its own seed. Prompts given as token ids
are taken as they are (no BOS added: the client tokenized them). `logprobs` / `top_logprobs`
list each token's log-probability and alternatives (`infra.serve.logprobs`); `echo` with
`logprobs` scores the prompt in its prefill, and `max_tokens` 0 then scores it alone (what
lm-evaluation-harness's `local-completions` asks for log-likelihoods).

Not supported (400 when asked for): best_of > 1, suffix, tools. `top_k` and `ignore_eos` are
accepted as extensions (as vLLM does). `max_tokens` defaults to 16 for completions (OpenAI's
default) and to the rest of the context for chat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from typing import Any

import numpy as np

from infra.data import chat
from infra.data.template_sandbox import TemplateBusy, TemplateSandbox
from infra.errors import DataError
from infra.serve import schemas
from infra.serve.engine import SamplingParams
from infra.serve.prometheus import PrometheusMetrics
from infra.serve.protocol import ApiError
from infra.serve.scheduler import Request, Scheduler

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# A prompt of more characters than this many times (context x longest token) cannot fit any
# context; it is refused without tokenizing it (slack for normalizers that drop characters).
PROMPT_CHARS_SLACK = 4
SEED_STRIDE = 0x9E3779B97F4A7C15  # between the seeds of a request's choices (odd: a bijection)


class Api:
    """What the endpoints share: scheduler, tokenizer, template and its sandbox, model name,
    metrics, limits, API key and drain state."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str | list[str],
                 metrics: PrometheusMetrics, template: str | None = None, *,
                 sandbox: TemplateSandbox | None = None, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        # the served models: the workdir's, then its stacked adapters' (`--adapter`), in the
        # engine's adapter order
        self.models = [model_name] if isinstance(model_name, str) else list(model_name)
        self.scheduler, self.tok, self.model_name = scheduler, tokenizer, self.models[0]
        self.metrics = metrics
        self.max_len = scheduler.engine.max_len
        self.draining = False
        self.template = chat.template_of(tokenizer, template)  # the run's (chat.run_template)
        self.sandbox = sandbox or TemplateSandbox(2)
        self.sandbox.check(self.template)  # one that does not parse fails at start
        self.api_key, self.max_body_bytes = api_key or None, max_body_bytes
        self.max_prompt_chars = PROMPT_CHARS_SLACK * self.max_len * tokenizer.longest_token_chars
        self.created = int(time.time())

    def _sampling(self, body: schemas.Sampled, choice: int = 0) -> SamplingParams:
        """Choice `choice` of `n`: the request's seed for the first, seeds derived from it for
        the others (so `n` seeded choices differ from each other and repeat exactly)."""
        seed = secrets.randbelow(2**31) if body.seed is None else (
            body.seed + choice * SEED_STRIDE) % (schemas.SEED_MAX + 1)
        return SamplingParams(
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else float(body.top_p),
            seed=seed)

    def _adapter(self, body: schemas.Sampled) -> int:
        """Which served model (the engine's adapter index) the request names; None = the
        first."""
        if body.model is None:
            return 0
        if body.model not in self.models:
            raise ApiError(404, f"The model '{body.model[:200]}' does not exist; this server "
                           f"serves {', '.join(repr(m) for m in self.models)}", param="model",
                           code="model_not_found")
        return self.models.index(body.model)

    def _too_long(self, n: int, unit: str = "tokens") -> ApiError:
        return ApiError(400, f"This model's maximum context length is {self.max_len} tokens; "
                        f"the prompt has {n:,} {unit} (it needs at least one more for the "
                        f"completion)", param="prompt", code="context_length_exceeded")

    async def _prompt_ids(self, prompt: str | list[int]) -> np.ndarray:
        """A text as the tokenizer encodes it (BOS for Llama 3, none for Qwen); token ids as
        they are (the client tokenized: an evaluation harness's context + continuation)."""
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                raise self._too_long(len(prompt), "characters")
            return self._checked(await asyncio.to_thread(self.tok.encode_prompt, prompt))
        if len(prompt) >= self.max_len:
            raise self._too_long(len(prompt))
        ids = np.asarray(prompt, np.int64)
        if ids.min() < 0 or ids.max() >= self.tok.vocab_size:
            raise ApiError(400, f"token ids must be in [0, {self.tok.vocab_size})",
                           param="prompt")
        return self._checked(ids)

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int32)
        if len(ids) == 0:
            raise ApiError(400, "the prompt is empty and this tokenizer has no BOS token",
                           param="prompt")
        if len(ids) >= self.max_len:
            raise self._too_long(len(ids))
        return ids

    async def _chat_ids(self, body: schemas.ChatRequest) -> np.ndarray:
        messages = [m.for_template() for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > self.max_prompt_chars:
            raise self._too_long(chars, "characters")
        try:  # rendered in the sandbox, awaited from a thread; tokenized in that thread
            ids = await asyncio.to_thread(chat.prompt_ids, self.tok, messages, self.template,
                                          self.sandbox)
        except TemplateBusy as e:
            raise ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self._checked(ids)  # the template decides BOS, as in fine-tuning

    async def parse(self, body: Any, *, chat_api: bool) -> Call:
        """The scheduler requests of a JSON body and how to answer them, or ApiError."""
        request = schemas.parse(schemas.ChatRequest if chat_api else schemas.CompletionRequest,
                                body)
        adapter = self._adapter(request)
        prompts = [None] if chat_api else request.prompt
        if len(prompts) * request.n > self.scheduler.max_queue:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={request.n} completions: at most "
                           f"{self.scheduler.max_queue} per request (the server's --max_queue)",
                           param="n")
        max_tokens = request.max_tokens
        if chat_api and request.max_completion_tokens is not None:
            max_tokens = request.max_completion_tokens
        if chat_api:
            top = request.top_logprobs or 0 if request.logprobs else None
        else:
            top = request.logprobs
        echo = not chat_api and request.echo
        requests, echoes, prompt_tokens = [], [], 0
        for prompt in prompts:
            ids = await (self._chat_ids(request) if chat_api else self._prompt_ids(prompt))
            prompt_tokens += len(ids)
            limit = max_tokens
            if limit is None:  # OpenAI's defaults: 16 for completions, the rest of the context
                limit = self.max_len - len(ids) if chat_api else 16
            for choice in range(request.n):
                requests.append(Request(
                    ids, self._sampling(request, choice), max_tokens=limit, stop=request.stops,
                    ignore_eos=request.ignore_eos, top_logprobs=top or 0,
                    score_prompt=echo and top is not None, adapter=adapter))
                if echo:
                    echoes.append(prompt if isinstance(prompt, str) else self.tok.decode(ids))
        include_usage = request.stream_options is not None and (
            request.stream_options.include_usage)
        return Call(requests, request.stream, include_usage, top, echoes if echo else None,
                    prompt_tokens, self.models[adapter])


@dataclasses.dataclass
class Call:
    """One API call: its choices (a scheduler request each, `index` = position) and how to
    answer them."""

    requests: list[Request]
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives listed per token; None: no logprobs asked for
    echo: list[str] | None  # per choice: the prompt's text, put before the completion
    prompt_tokens: int  # of every prompt once (usage counts a prompt once for n choices)
    model: str  # the served model (adapter) it names
