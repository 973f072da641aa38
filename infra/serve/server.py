"""The OpenAI-compatible HTTP API over the scheduler (FastAPI, served by uvicorn).

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

Requests are validated here and answered with OpenAI's error shape, ``{"error": {"message",
"type", "param", "code"}}``: 400 for a malformed body, 404 for another model, 429 when the
bounded queue is full, 503 while draining. Each request gets an asyncio queue that the
scheduler's thread feeds (`loop.call_soon_threadsafe`); a client that goes away (a closed
stream, or a dropped connection while waiting for a non-streamed answer) cancels its request,
which frees its slot before the next decode step.

Not supported (400 when asked for): n > 1, best_of > 1, echo, logprobs, suffix, tools.
`top_k` and `ignore_eos` are accepted as extensions (as vLLM does). `max_tokens` defaults to 16 for
completions (OpenAI's default) and to the rest of the context for chat.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import secrets
import threading
import time
from typing import Any

import numpy as np
from fastapi import Request as HttpRequest  # module level: FastAPI resolves the annotations here

from infra.data import chat
from infra.errors import DataError
from infra.serve.engine import SamplingParams
from infra.serve.scheduler import (Draining, Finished, Metrics, QueueFull, Request, Scheduler,
                                   Token)

SEED_MAX = 2**63 - 1
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --- metrics --------------------------------------------------------------------------------------
class PrometheusMetrics(Metrics):
    """TTFT, inter-token and end-to-end latency histograms, queue length, busy slots, tokens/s."""

    def __init__(self, scheduler_ref: list):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        latency = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.h_ttft = Histogram("infra_serve_time_to_first_token_seconds",
                                "From arrival to the first token", buckets=latency, registry=r)
        self.h_itl = Histogram("infra_serve_inter_token_latency_seconds",
                               "Between two tokens of one request", buckets=latency, registry=r)
        self.h_e2e = Histogram("infra_serve_e2e_request_latency_seconds",
                               "From arrival to the last token", buckets=latency, registry=r)
        self.c_prompt = Counter("infra_serve_prompt_tokens", "Prompt tokens", registry=r)
        self.c_generated = Counter("infra_serve_generation_tokens", "Generated tokens", registry=r)
        self.c_requests = Counter("infra_serve_requests", "Finished requests", ["finish_reason"],
                                  registry=r)
        self.c_rejected = Counter("infra_serve_rejected_requests", "Refused requests",
                                  ["reason"], registry=r)
        sched = lambda: scheduler_ref[0]  # noqa: E731
        Gauge("infra_serve_queue_length", "Requests waiting for a slot",
              registry=r).set_function(lambda: len(sched().queue))
        Gauge("infra_serve_busy_slots", "Slots decoding a request",
              registry=r).set_function(lambda: sched().busy)
        Gauge("infra_serve_slots", "Decode slots", registry=r).set_function(
            lambda: len(sched().slots))
        Gauge("infra_serve_tokens_per_second", "Tokens produced per second over the last 5 s",
              registry=r).set_function(self.tokens_per_second)
        self._times: collections.deque[float] = collections.deque(maxlen=200_000)
        self._lock = threading.Lock()

    def tokens_per_second(self, window: float = 5.0) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._times and self._times[0] < now - window:
                self._times.popleft()
            return len(self._times) / window

    def ttft(self, seconds: float) -> None:
        self.h_ttft.observe(seconds)
        self._token()

    def inter_token(self, seconds: float) -> None:
        self.h_itl.observe(seconds)
        self._token()

    def _token(self) -> None:
        with self._lock:
            self._times.append(time.perf_counter())

    def finished(self, request: Request) -> None:
        self.c_requests.labels(request.finished.reason).inc()
        self.c_prompt.inc(len(request.ids))
        self.c_generated.inc(len(request.token_ids))
        if request.last_token_at is not None:
            self.h_e2e.observe(request.last_token_at - request.arrived)


# --- request parsing --------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low: float, high: float, *, integer=False):
    value = body.get(name, default)
    if value is None:
        value = default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (low <= value <= high) or (
            not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}",
                       param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS}"
                       " non-empty strings", param="stop")
    return tuple(stops)


def _unsupported(body: dict) -> None:
    checks = {"n": lambda v: v in (None, 1), "best_of": lambda v: v in (None, 1),
              "echo": lambda v: v in (None, False), "logprobs": lambda v: v in (None, False),
              "top_logprobs": lambda v: v in (None, 0), "suffix": lambda v: v is None,
              "tools": lambda v: not v}
    for name, ok in checks.items():
        if not ok(body.get(name)):
            raise ApiError(400, f"'{name}'={body[name]!r} is not supported by this server",
                           param=name)


class Api:
    """What the endpoints share: scheduler, tokenizer, model name, metrics, drain state."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str,
                 metrics: PrometheusMetrics, template: str | None = None):
        self.scheduler, self.tok, self.model_name = scheduler, tokenizer, model_name
        self.metrics = metrics
        self.max_len = scheduler.engine.max_len
        self.draining = False
        self.template = chat.template_of(tokenizer, template)  # the run's (chat.run_template)
        chat.compile_template(self.template)  # one that does not parse fails at start
        self.created = int(time.time())

    def _sampling(self, body: dict) -> SamplingParams:
        seed = body.get("seed")
        seed = secrets.randbelow(2**31) if seed is None else _number(body, "seed", 0, 0, SEED_MAX,
                                                                     integer=True)
        return SamplingParams(temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                              top_k=_number(body, "top_k", 0, 0, 2**31 - 1, integer=True),
                              top_p=float(_number(body, "top_p", 1.0, 1e-9, 1)), seed=seed)

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")

    def _prompt_ids(self, body: dict) -> np.ndarray:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt)
        elif (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
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
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens; "
                           f"the prompt has {len(ids)} (it needs at least one more for the "
                           f"completion)", param="prompt", code="context_length_exceeded")
        return ids

    def _chat_ids(self, body: dict) -> np.ndarray:
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
        try:
            ids = chat.prompt_ids(self.tok, clean, self.template)
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self._checked(ids)  # the template decides BOS, as in fine-tuning

    def parse(self, body: Any, *, chat_api: bool) -> tuple[Request, bool, bool]:
        """(request, stream, include_usage) of a JSON body, or ApiError."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._check_model(body)
        _unsupported(body)
        ids = self._chat_ids(body) if chat_api else self._prompt_ids(body)
        room = self.max_len - len(ids)
        if chat_api and body.get("max_completion_tokens") is not None:
            max_tokens = _number(body, "max_completion_tokens", room, 1, 2**31 - 1, integer=True)
        else:
            max_tokens = _number(body, "max_tokens", room if chat_api else 16, 1, 2**31 - 1,
                                 integer=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
        request = Request(ids, self._sampling(body), max_tokens=int(max_tokens),
                          stop=_stops(body), ignore_eos=ignore_eos)
        return request, stream, bool(options.get("include_usage", False))


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

    @app.get("/health")
    async def health():
        if api.scheduler.error is not None:
            return error(ApiError(500, f"the engine failed: {api.scheduler.error!r}",
                                  "server_error"))
        if api.draining:
            return error(ApiError(503, "draining: shutting down", "server_error"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": api.model_name, "object": "model",
                                            "created": api.created, "owned_by": "infra",
                                            "max_model_len": api.max_len}]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(api.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    async def handle(http: HttpRequest, chat_api: bool):
        if api.draining:
            api.metrics.c_rejected.labels("draining").inc()
            return error(ApiError(503, "the server is shutting down; retry elsewhere",
                                  "server_error", code="draining"))
        try:
            body = json.loads(await http.body())
        except ValueError:
            return error(ApiError(400, "the request body is not valid JSON"))
        try:
            request, stream, include_usage = api.parse(body, chat_api=chat_api)
        except ApiError as e:
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
