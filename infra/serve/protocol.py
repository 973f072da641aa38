"""The OpenAI protocol's edges: errors in OpenAI's shape, the API key, and the untrusted request
body read, bounded and checked before anything else looks at it (its fields are then validated
by `infra.serve.schemas`).

Every failure a client can cause is an `ApiError`, answered as `{"error": {"message", "type",
"param", "code"}}` with its status: 400 a malformed request, 401 a missing or wrong API key, 404
another model, 413 a body over the size limit, 429 the server at capacity, 503 draining. A body
is read at most `limit` bytes (a larger one is refused as it arrives, not after), parsed as JSON
(nesting too deep for the parser is a 400, not a crash), and every string in it must be
encodable as UTF-8 (JSON's `\\ud800` escapes can make lone surrogates, which no tokenizer takes).
"""

from __future__ import annotations

import json
import secrets
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def check_api_key(authorization: str | None, key: str | None) -> None:
    """ApiError 401 unless `key` is unset or `authorization` is `Bearer <key>`."""
    if key is None:
        return
    if not authorization:
        raise ApiError(401, "You didn't provide an API key; pass it as 'Authorization: Bearer "
                       "<key>' (the openai client's api_key)", code="invalid_api_key")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(),
                                                                key.encode()):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


async def read_json(http, limit: int) -> Any:
    """The request's JSON body, read at most `limit` bytes (ApiError 413 beyond), parsed and
    checked for lone surrogates (ApiError 400)."""
    length = http.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None
    except ValueError:  # also invalid UTF-8
        raise ApiError(400, "the request body is not valid JSON") from None
    _check_strings(body)
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit:,} bytes (the server's "
                    f"--max_body_mb)", code="request_too_large")


def _check_strings(body: Any) -> None:
    """ApiError 400 naming the first top-level field that holds a string that is not valid
    Unicode text (a lone surrogate). Iterative: the parser already bounded the depth."""
    fields = body.items() if isinstance(body, dict) else [(None, body)]
    for name, value in fields:
        stack = [name, value] if isinstance(name, str) else [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    where = f"'{name}'" if name is not None else "the body"
                    raise ApiError(400, f"{where} holds a lone UTF-16 surrogate (e.g. \\ud800), "
                                   "which is not text; send valid Unicode", param=name) from None
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
