"""The OpenAI protocol's request and response bodies, as pydantic models (what FastAPI ships).

Requests are validated strictly (a string is not a number, `true` is not an integer, NaN is not
a temperature), unknown fields are ignored as OpenAI's own server does, and fields this server
does not implement are refused rather than ignored. A failed validation becomes one `ApiError`
(400) naming the field (`param`) and what was wrong with it.

Responses are the objects the `openai` client parses: `Completion` / `ChatCompletion` and their
streamed chunks, with `usage`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

from infra.serve.protocol import ApiError

MAX_STOPS = 4
MAX_STOP_CHARS = 256  # each token is checked against every stop string's prefixes
SEED_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_TOP_LOGPROBS = 20  # the engine computes this many alternatives per token
MAX_N = 16

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# Fields of the API this server does not implement, with the values that mean "not asked for".
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None,), "tools": (None, [])}
TopCount = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampled(_Strict):
    """What every generation request carries: model, sampling, length, stops, streaming."""

    model_config = ConfigDict(strict=True, extra="allow")  # extras: checked by `unsupported`

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None  # an extension (as vLLM)
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (as vLLM)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in items):
            raise ValueError(f"'stop' must be a string or a list of at most {MAX_STOPS} "
                             f"strings, each of 1 to {MAX_STOP_CHARS} characters")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(
            self.stop)

    def unsupported(self) -> None:
        """ApiError 400 for a field this server does not implement (rather than ignore it)."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ApiError(400, f"'{name}'={value!r} is not supported by this server",
                               param=name)


class CompletionRequest(Sampled):
    """`POST /v1/completions`: one prompt or several, each a text or token ids (taken as they
    are); `echo` puts the prompt before each completion (with `logprobs`: its tokens' too);
    `max_tokens` 0 with `echo` scores the prompt alone (a log-likelihood)."""

    prompt: list[str | list[int]]
    echo: bool = False
    logprobs: TopCount | None = None  # the likeliest alternatives listed per token
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt):
        def ids(p):
            return isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)

        if isinstance(prompt, str) or ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(
                isinstance(p, str) or ids(p) for p in prompt):
            return prompt
        raise ValueError("'prompt' must be a string, a non-empty list of token ids, or a "
                         "non-empty list of those")

    @model_validator(mode="after")
    def _zero_tokens_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("'max_tokens' may be 0 only with 'echo' (to score the prompt)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls, ...: to the template

    role: str
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, list) and not all(
                isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ValueError("only text parts are supported")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        return {**(self.model_extra or {}), "role": self.role, "content": self.text()}


class ChatRequest(Sampled):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: TopCount | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self


def _where(loc: tuple) -> str:
    """`("messages", 0, "content")` -> `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif part not in ("str", "list[str]", "list[int]", "list[TextPart]"):  # union members
            out += f".{part}"
    return out


def parse(model: type[Sampled], body: Any) -> Sampled:
    """The validated request, or ApiError 400 naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = _where(error["loc"])
        if error["type"] == "value_error":  # our own message
            message = str(error["ctx"]["error"])
            message = message if message.startswith("'") else f"'{where}': {message}"
        elif error["type"] == "missing":
            message = f"'{where}' is required"
        else:
            given = repr(error["input"])
            message = f"'{where}': {error['msg'][0].lower()}{error['msg'][1:]}, got " \
                      f"{given[:100]}"
        raise ApiError(400, message, param=where.split("[")[0].split(".")[0] or None,
                       code=None) from None
    request.unsupported()
    return request


# ------------------------------------------------------------------------------ responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of a completion's text (the echoed prompt's first, whose first has None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class Delta(BaseModel):
    """What a streamed chunk adds to the message: the role first, then text; {} at the end."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present(self) -> dict:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class _Response(BaseModel):
    id: str
    created: int
    model: str


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
