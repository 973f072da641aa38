"""The HTTP routes (FastAPI, served by uvicorn) and the responses they write.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

A request is read (`infra.serve.protocol`), validated into scheduler requests, one per choice
(`Api.parse`), submitted together, and answered as one `Completion` / `ChatCompletion` or as a
stream of chunks (`infra.serve.responses`). Every failure is OpenAI's error shape with its status; an unexpected
exception while handling one is a 500 in that shape too, and the server keeps serving.

Each call gets an asyncio queue that the scheduler's thread feeds with (choice, event)
(`loop.call_soon_threadsafe`); a client that goes away (a closed stream, or a dropped
connection while waiting for a non-streamed answer) cancels its requests, which frees their
slots before the next decode step.
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

from infra.serve import protocol
from infra.serve.protocol import ApiError
from infra.serve.responses import Answer
from infra.serve.scheduler import Draining, Finished, QueueFull
from infra.serve.server import Api, Call

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
        return {"object": "list", "data": [{"id": name, "object": "model",
                                            "created": api.created, "owned_by": "infra",
                                            "max_model_len": api.max_len}
                                           for name in api.models]}

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
    """Read, validate and submit one call's requests; answer them whole or streamed."""
    if api.draining:
        api.metrics.c_rejected.labels("draining").inc()
        return error(ApiError(503, "the server is shutting down; retry elsewhere",
                              "server_error", code="draining"))
    try:
        protocol.check_api_key(http.headers.get("authorization"), api.api_key)
        body = await protocol.read_json(http, api.max_body_bytes)
        call = await api.parse(body, chat_api=chat_api)
    except ApiError as e:
        if e.status == 429:
            api.metrics.c_rejected.labels("template_busy").inc()
        return error(e)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for i, request in enumerate(call.requests):
        request.emit = lambda event, i=i: loop.call_soon_threadsafe(events.put_nowait,
                                                                    (i, event))
    try:
        api.scheduler.submit_all(call.requests)
    except QueueFull as e:
        api.metrics.c_rejected.labels("queue_full").inc()
        return error(ApiError(429, f"the server is at capacity ({e}); retry later",
                              "rate_limit_error", code="rate_limit_exceeded"))
    except Draining:
        api.metrics.c_rejected.labels("draining").inc()
        return error(ApiError(503, "the server is shutting down", "server_error",
                              code="draining"))
    ident = ("chatcmpl-" if chat_api else "cmpl-") + secrets.token_hex(12)
    answer = Answer(api.tok, call, {"id": ident, "created": int(time.time()),
                                    "model": call.model}, chat_api)
    if call.stream:
        return StreamingResponse(_stream(api, call, events, answer),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(api, http, call, events, answer)


def _cancel_unfinished(api: Api, call: Call) -> None:
    for request in call.requests:
        if request.finished is None:
            api.scheduler.cancel(request)


async def _whole(api: Api, http, call: Call, events: asyncio.Queue, answer: Answer):
    """Wait for every choice; a client that disconnects meanwhile cancels them."""
    try:
        left = len(call.requests)
        while left:
            try:
                _, event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    _cancel_unfinished(api, call)
                    return JSONResponse({}, status_code=499)
                continue
            left -= isinstance(event, Finished)
    finally:
        _cancel_unfinished(api, call)
    if any(r.finished.reason == "error" for r in call.requests):
        return error(ApiError(500, "the engine failed", "server_error"))
    if call.logprobs is not None:  # decoding every token and alternative: off the event loop
        return JSONResponse(await asyncio.to_thread(answer.whole))
    return JSONResponse(answer.whole())


async def _stream(api: Api, call: Call, events: asyncio.Queue, answer: Answer):
    """Server-sent events (`infra.serve.responses`). Closing the stream (client gone) cancels
    every unfinished choice."""
    try:
        for chunk in answer.opening():
            yield chunk
        left = len(call.requests)
        while left:
            i, event = await events.get()
            left -= isinstance(event, Finished)
            for chunk in answer.event(i, event):
                yield chunk
        for chunk in answer.closing(call.include_usage):
            yield chunk
    finally:
        _cancel_unfinished(api, call)
