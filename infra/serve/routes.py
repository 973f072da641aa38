"""The HTTP routes (FastAPI, served by uvicorn) and the responses they write.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

A request is read (`infra.serve.protocol`), validated into a scheduler request (`Api.parse`),
submitted, and answered as one `Completion` / `ChatCompletion` or as a stream of chunks
(`infra.serve.schemas`). Every failure is OpenAI's error shape with its status; an unexpected
exception while handling one is a 500 in that shape too, and the server keeps serving.

Each request gets an asyncio queue that the scheduler's thread feeds
(`loop.call_soon_threadsafe`); a client that goes away (a closed stream, or a dropped
connection while waiting for a non-streamed answer) cancels its request, which frees its slot
before the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from fastapi import FastAPI
from fastapi import Request as HttpRequest  # module level: FastAPI resolves the annotations here
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from infra.serve import protocol, schemas
from infra.serve.protocol import ApiError
from infra.serve.scheduler import Draining, Finished, QueueFull, Request, Token
from infra.serve.server import Api

log = logging.getLogger(__name__)


def error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(api: Api) -> FastAPI:
    """The FastAPI application."""
    app = FastAPI(title="infra serve", docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app)

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

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await _generate(api, http, chat_api=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await _generate(api, http, chat_api=True)

    return app


def _error_handlers(app: FastAPI) -> None:
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


async def _generate(api: Api, http: HttpRequest, chat_api: bool):
    """Read, validate and submit one completion request; answer it whole or streamed."""
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
        return StreamingResponse(_stream(api, request, events, base, chat_api, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(api, http, request, events, base, chat_api)


def _usage(f: Finished) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                         total_tokens=f.prompt_tokens + f.completion_tokens)


def _reason(f: Finished) -> str:
    return f.reason if f.reason in ("stop", "length") else "stop"


async def _whole(api: Api, http, request: Request, events: asyncio.Queue, base: dict,
                 chat_api: bool):
    """Wait for the whole completion; a client that disconnects meanwhile cancels it."""
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
        return error(ApiError(500, "the engine failed", "server_error"))
    if chat_api:
        answer = schemas.ChatCompletion(**base, usage=_usage(f), choices=[schemas.ChatChoice(
            message=schemas.AssistantMessage(content=f.text), finish_reason=_reason(f))])
    else:
        answer = schemas.Completion(**base, usage=_usage(f), choices=[schemas.CompletionChoice(
            text=f.text, finish_reason=_reason(f))])
    return JSONResponse(answer.model_dump(mode="json"))


async def _stream(api: Api, request: Request, events: asyncio.Queue, base: dict,
                  chat_api: bool, include_usage: bool):
    """Server-sent events: one chunk per piece of text, the finish reason, optionally the
    usage, then `data: [DONE]`. Closing the stream (client gone) cancels the request."""
    # `usage` is null in every chunk but the last when the client asked for it, else absent
    exclude = None if include_usage else {"usage"}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat_api:
            delta = schemas.Delta(role="assistant", content="") if first else schemas.Delta(
                content=text)
            out = schemas.ChatCompletionChunk(**base, choices=[schemas.ChatChunkChoice(
                delta=delta, finish_reason=finish)])
        else:
            out = schemas.Completion(**base, choices=[schemas.CompletionChoice(
                text=text or "", finish_reason=finish)])
        return f"data: {out.model_dump_json(exclude=exclude)}\n\n"

    def usage(f: Finished) -> str:
        kind = schemas.ChatCompletionChunk if chat_api else schemas.Completion
        return f"data: {kind(**base, choices=[], usage=_usage(f)).model_dump_json()}\n\n"

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
                yield usage(event)
            yield "data: [DONE]\n\n"
            return
    finally:
        if request.finished is None:
            api.scheduler.cancel(request)
