"""The OpenAI-compatible HTTP API over the scheduler (FastAPI, served by uvicorn).

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

Requests are read and validated by `infra.serve.protocol` and answered with OpenAI's error
shape; an unexpected exception while handling one is a 500 in that shape too, and the server
keeps serving. Nothing a request carries runs on the event loop for long: its body is bounded
(`max_body_bytes`), the chat template renders in `infra.data.template_sandbox`'s worker
processes (bounded in time and memory; awaited from a thread), and tokenization runs in a
thread (the Rust tokenizer releases the GIL), after a prompt too long for any context was
refused by its length alone. With an API key set, the `/v1` routes need `Authorization: Bearer
<key>` (401 otherwise); `/health` and `/metrics` stay open for probes and scrapers.

Each request gets an asyncio queue that the scheduler's thread feeds
(`loop.call_soon_threadsafe`); a client that goes away (a closed stream, or a dropped
connection while waiting for a non-streamed answer) cancels its request, which frees its slot
before the next decode step.

Not supported (400 when asked for): n > 1, best_of > 1, echo, logprobs, suffix, tools.
`top_k` and `ignore_eos` are accepted as extensions (as vLLM does). `max_tokens` defaults to 16 for
completions (OpenAI's default) and to the rest of the context for chat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

import numpy as np
from fastapi import Request as HttpRequest  # module level: FastAPI resolves the annotations here

from infra.data import chat
from infra.data.template_sandbox import TemplateBusy, TemplateSandbox
from infra.errors import DataError
from infra.serve import protocol
from infra.serve.engine import SamplingParams
from infra.serve.prometheus import PrometheusMetrics
from infra.serve.protocol import ApiError
from infra.serve.scheduler import Draining, Finished, QueueFull, Request, Scheduler, Token

log = logging.getLogger(__name__)
SEED_MAX = 2**63 - 1
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# A prompt of more characters than this many times (context x longest token) cannot fit any
# context; it is refused without tokenizing it (slack for normalizers that drop characters).
PROMPT_CHARS_SLACK = 4


class Api:
    """What the endpoints share: scheduler, tokenizer, template and its sandbox, model name,
    metrics, limits, API key and drain state."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str,
                 metrics: PrometheusMetrics, template: str | None = None, *,
                 sandbox: TemplateSandbox | None = None, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.scheduler, self.tok, self.model_name = scheduler, tokenizer, model_name
        self.metrics = metrics
        self.max_len = scheduler.engine.max_len
        self.draining = False
        self.template = chat.template_of(tokenizer, template)  # the run's (chat.run_template)
        self.sandbox = sandbox or TemplateSandbox(2)
        self.sandbox.check(self.template)  # one that does not parse fails at start
        self.api_key, self.max_body_bytes = api_key or None, max_body_bytes
        self.max_prompt_chars = PROMPT_CHARS_SLACK * self.max_len * tokenizer.longest_token_chars
        self.created = int(time.time())

    def _sampling(self, body: dict) -> SamplingParams:
        seed = body.get("seed")
        seed = secrets.randbelow(2**31) if seed is None else protocol.number(
            body, "seed", 0, 0, SEED_MAX, integer=True)
        return SamplingParams(
            temperature=float(protocol.number(body, "temperature", 1.0, 0, 2)),
            top_k=protocol.number(body, "top_k", 0, 0, 2**31 - 1, integer=True),
            top_p=float(protocol.number(body, "top_p", 1.0, 1e-9, 1)), seed=seed)

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model '{str(model)[:200]}' does not exist; this server "
                           f"serves '{self.model_name}'", param="model", code="model_not_found")

    def _too_long(self, n: int, unit: str = "tokens") -> ApiError:
        return ApiError(400, f"This model's maximum context length is {self.max_len} tokens; "
                        f"the prompt has {n:,} {unit} (it needs at least one more for the "
                        f"completion)", param="prompt", code="context_length_exceeded")

    async def _prompt_ids(self, body: dict) -> np.ndarray:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                raise self._too_long(len(prompt), "characters")
            ids = await asyncio.to_thread(self.tok.encode, prompt)
        elif (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            if len(prompt) >= self.max_len:
                raise self._too_long(len(prompt))
            ids = np.asarray(prompt, np.int64)
            if ids.min() < 0 or ids.max() >= self.tok.vocab_size:
                raise ApiError(400, f"token ids must be in [0, {self.tok.vocab_size})",
                               param="prompt")
            ids = ids.astype(np.int32)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of one string, or a "
                           "non-empty list of token ids (one prompt: n = 1)", param="prompt")
        return self._with_bos(ids)

    def _with_bos(self, ids: np.ndarray) -> np.ndarray:
        bos = self.tok.bos_id
        if bos is not None and (len(ids) == 0 or ids[0] != bos):
            ids = np.concatenate([[bos], ids])
        return self._checked(ids)

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int32)
        if len(ids) == 0:
            raise ApiError(400, "the prompt is empty and this tokenizer has no BOS token",
                           param="prompt")
        if len(ids) >= self.max_len:
            raise self._too_long(len(ids))
        return ids

    def _messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'",
                               param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if content is not None and not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string",
                               param=f"messages[{i}].content")
            clean.append({**m, "content": content or ""})
        if sum(len(m["content"]) for m in clean) > self.max_prompt_chars:
            raise self._too_long(sum(len(m["content"]) for m in clean), "characters")
        return clean

    async def _chat_ids(self, body: dict) -> np.ndarray:
        messages = self._messages(body)
        try:  # rendered in the sandbox, awaited from a thread; tokenized in that thread
            ids = await asyncio.to_thread(chat.prompt_ids, self.tok, messages, self.template,
                                          self.sandbox)
        except TemplateBusy as e:
            raise ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self._checked(ids)  # the template decides BOS, as in fine-tuning

    async def parse(self, body: Any, *, chat_api: bool) -> tuple[Request, bool, bool]:
        """(request, stream, include_usage) of a JSON body, or ApiError."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._check_model(body)
        protocol.unsupported(body)
        stream = protocol.flag(body, "stream")
        ignore_eos = protocol.flag(body, "ignore_eos")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = protocol.flag(options, "include_usage")
        stop, sampling = protocol.stops(body), self._sampling(body)
        name = ("max_completion_tokens" if chat_api and body.get("max_completion_tokens")
                is not None else "max_tokens")
        max_tokens = None if body.get(name) is None else protocol.number(
            body, name, None, 1, 2**31 - 1, integer=True)
        ids = await (self._chat_ids(body) if chat_api else self._prompt_ids(body))
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context
            max_tokens = self.max_len - len(ids) if chat_api else 16
        request = Request(ids, sampling, max_tokens=int(max_tokens), stop=stop,
                          ignore_eos=ignore_eos)
        return request, stream, include_usage


def _usage(f: Finished) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def _reason(f: Finished) -> str:
    return f.reason if f.reason in ("stop", "length") else "stop"


def create_app(api: Api):
    """The FastAPI application."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    app = FastAPI(title="infra serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(ApiError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # a bug of ours: logged, 500, still serving
        log.error("error handling %s %s", request.method, request.url.path, exc_info=exc)
        return error(ApiError(500, f"internal error ({type(exc).__name__}); the server goes on "
                              "serving", "server_error"))

    @app.get("/health")
    async def health():
        if api.scheduler.error is not None:
            return error(ApiError(500, f"the engine failed: {api.scheduler.error!r}",
                                  "server_error"))
        if api.draining:
            return error(ApiError(503, "draining: shutting down", "server_error"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        try:
            protocol.check_api_key(http.headers.get("authorization"), api.api_key)
        except ApiError as e:
            return error(e)
        return {"object": "list", "data": [{"id": api.model_name, "object": "model",
                                            "created": api.created, "owned_by": "infra",
                                            "max_model_len": api.max_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(api.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    async def handle(http: HttpRequest, chat_api: bool):
        if api.draining:
            api.metrics.c_rejected.labels("draining").inc()
            return error(ApiError(503, "the server is shutting down; retry elsewhere",
                                  "server_error", code="draining"))
        try:
            protocol.check_api_key(http.headers.get("authorization"), api.api_key)
            body = await protocol.read_json(http, api.max_body_bytes)
            request, stream, include_usage = await api.parse(body, chat_api=chat_api)
        except ApiError as e:
            if e.status == 429:
                api.metrics.c_rejected.labels("template_busy").inc()
            return error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            api.scheduler.submit(request)
        except QueueFull as e:
            api.metrics.c_rejected.labels("queue_full").inc()
            return error(ApiError(429, f"the server is at capacity ({e}); retry later",
                                  "rate_limit_error", code="rate_limit_exceeded"))
        except Draining:
            api.metrics.c_rejected.labels("draining").inc()
            return error(ApiError(503, "the server is shutting down", "server_error",
                                  code="draining"))
        ident = ("chatcmpl-" if chat_api else "cmpl-") + secrets.token_hex(12)
        base = {"id": ident, "created": int(time.time()), "model": api.model_name}
        if stream:
            return StreamingResponse(
                _stream(api, request, events, base, chat_api, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(api, http, request, events, base, chat_api)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await handle(http, chat_api=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await handle(http, chat_api=True)

    return app


async def _whole(api: Api, http, request: Request, events: asyncio.Queue, base: dict,
                 chat_api: bool):
    """Wait for the whole completion; a client that disconnects meanwhile cancels it."""
    from fastapi.responses import JSONResponse

    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    api.scheduler.cancel(request)
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(event, Finished):
                break
    finally:
        if request.finished is None:
            api.scheduler.cancel(request)
    f = event
    if f.reason == "error":
        return JSONResponse(ApiError(500, "the engine failed", "server_error").body(), 500)
    if chat_api:
        choice = {"index": 0, "message": {"role": "assistant", "content": f.text},
                  "logprobs": None, "finish_reason": _reason(f)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": f.text, "logprobs": None, "finish_reason": _reason(f)}
        obj = "text_completion"
    return JSONResponse({**base, "object": obj, "choices": [choice], "usage": _usage(f)})


async def _stream(api: Api, request: Request, events: asyncio.Queue, base: dict,
                  chat_api: bool, include_usage: bool):
    """Server-sent events: one chunk per piece of text, the finish reason, optionally the
    usage, then `data: [DONE]`. Closing the stream (client gone) cancels the request."""
    obj = "chat.completion.chunk" if chat_api else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat_api:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'object': obj, 'choices': [choice], **extra})}\n\n"

    try:
        if chat_api:
            yield chunk(None, None, first=True)
        while True:
            event = await events.get()
            if isinstance(event, Token):
                if event.text:
                    yield chunk(event.text, None)
                continue
            yield chunk(None, _reason(event))
            if include_usage:
                yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': _usage(event)})}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if request.finished is None:
            api.scheduler.cancel(request)
