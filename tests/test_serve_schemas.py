"""The OpenAI request / response schemas (infra/serve/schemas.py), in-process: what a bad body
is answered with, and that the `openai` client's own types parse what the server writes."""

from __future__ import annotations

import math

import openai.types as oa
import openai.types.chat as oac
import pytest

from infra.serve import schemas
from infra.serve.protocol import ApiError

BAD_COMPLETIONS = [
    ([1, 2], None, "must be a JSON object"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "x", "temperature": math.nan}, "temperature", "finite"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "x", "seed": True}, "seed", "valid integer"),
    ({"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
    ({"prompt": "x", "stream_options": []}, "stream_options", ""),
    ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "x", "n": 17}, "n", "less than or equal to 16"),
    ({"prompt": "x", "best_of": 2}, "best_of", "'best_of'=2 is not supported"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "valid integer"),
    ({"prompt": "x", "echo": 1}, "echo", "valid boolean"),
    ({"prompt": "x", "max_tokens": 0}, None, "'max_tokens' may be 0 only with 'echo'"),
    ({"prompt": 5}, "prompt", "'prompt' must be a string"),
    ({"prompt": []}, "prompt", "'prompt' must be a string"),
    ({"prompt": ["a", 1]}, "prompt", "'prompt' must be a string"),
    ({"prompt": [[1], []]}, "prompt", "'prompt' must be a string"),
    ({"prompt": [1, True]}, "prompt", "'prompt' must be a string"),
    ({}, "prompt", "'prompt' is required"),
    ({"prompt": "a", "stop": "s" * 1000}, "stop", "'stop' must be"),
    ({"prompt": "a", "stop": ["a"] * 5}, "stop", "at most 4 strings"),
    ({"prompt": "a", "model": 3}, "model", "valid string"),
]


@pytest.mark.parametrize("body, param, needle", BAD_COMPLETIONS)
def test_a_bad_completion_body_is_one_400_naming_its_field(body, param, needle):
    with pytest.raises(ApiError) as e:
        schemas.parse(schemas.CompletionRequest, body)
    assert e.value.status == 400 and e.value.param == param, e.value.body()
    assert needle in e.value.message and "\n" not in e.value.message, e.value.message


@pytest.mark.parametrize("body, needle", [
    ({"messages": "hi"}, "valid list"),
    ({"messages": []}, "at least 1 item"),
    ({"messages": [{"content": "x"}]}, "'messages[0].role' is required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "greater"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs 'logprobs'"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "less than or equal to 20"),
])
def test_a_bad_chat_body_is_one_400_naming_messages(body, needle):
    with pytest.raises(ApiError) as e:
        schemas.parse(schemas.ChatRequest, body)
    assert e.value.status == 400 and needle in e.value.message, e.value.message
    assert e.value.param in ("messages", "max_completion_tokens", "top_logprobs", None)


def test_good_bodies_keep_what_the_server_needs():
    r = schemas.parse(schemas.CompletionRequest, {
        "prompt": ["hello"], "stop": "\n", "temperature": 0, "top_k": 5, "seed": 2**63 - 1,
        "user": "ignored", "tools": [], "stream": True, "stream_options": {"include_usage": True}})
    assert r.prompt == ["hello"] and r.stops == ("\n",) and r.temperature == 0 and r.top_k == 5
    assert r.stream and r.stream_options.include_usage
    assert schemas.parse(schemas.CompletionRequest, {"prompt": [3, 4]}).prompt == [[3, 4]]
    many = schemas.parse(schemas.CompletionRequest, {"prompt": [[3], [4, 5]], "n": 2, "echo": True,
                                                     "logprobs": 0, "max_tokens": 0})
    assert many.prompt == [[3], [4, 5]] and many.n == 2 and many.logprobs == 0
    chat = schemas.parse(schemas.ChatRequest, {"messages": [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "bob"}]})
    assert [m.for_template() for m in chat.messages] == [
        {"role": "system", "content": ""}, {"role": "user", "content": "ab", "name": "bob"}]


def test_the_openai_client_parses_every_response_the_server_writes():
    base = {"id": "cmpl-1", "created": 1, "model": "m"}
    usage = schemas.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    whole = schemas.Completion(**base, usage=usage, choices=[
        schemas.CompletionChoice(text="hi", finish_reason="length")])
    got = oa.Completion.model_validate_json(whole.model_dump_json())
    assert got.choices[0].text == "hi" and got.usage.total_tokens == 5
    chat = schemas.ChatCompletion(**base, usage=usage, choices=[schemas.ChatChoice(
        message=schemas.AssistantMessage(content="yo"), finish_reason="stop")])
    got = oac.ChatCompletion.model_validate_json(chat.model_dump_json())
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == "yo"
    first = schemas.ChatCompletionChunk(**base, choices=[schemas.ChatChunkChoice(
        delta=schemas.Delta(role="assistant", content=""), finish_reason=None)])
    last = schemas.ChatCompletionChunk(**base, choices=[schemas.ChatChunkChoice(
        delta=schemas.Delta(), finish_reason="stop")])
    assert '"delta":{}' in last.model_dump_json(exclude={"usage"})
    for chunk in (first, last):
        parsed = oac.ChatCompletionChunk.model_validate_json(chunk.model_dump_json())
        assert parsed.choices[0].finish_reason == chunk.choices[0].finish_reason
    assert oac.ChatCompletionChunk.model_validate_json(
        first.model_dump_json()).choices[0].delta.role == "assistant"


def test_the_openai_client_parses_logprobs():
    base = {"id": "cmpl-1", "created": 1, "model": "m"}
    usage = schemas.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    # (an echoed prompt's first token has null entries: the client does not validate
    # responses, tests/test_serve_http.py reads them through it)
    lp = schemas.CompletionLogprobs(tokens=["a", "b"], token_logprobs=[-0.25, -0.5],
                                    top_logprobs=[{"a": -0.25}, {"b": -0.5, "c": -1.5}],
                                    text_offset=[0, 1])
    got = oa.Completion.model_validate_json(schemas.Completion(**base, usage=usage, choices=[
        schemas.CompletionChoice(index=1, text="ab", logprobs=lp, finish_reason="length")
    ]).model_dump_json())
    assert got.choices[0].logprobs.top_logprobs[1] == {"b": -0.5, "c": -1.5}
    assert got.choices[0].index == 1 and got.choices[0].logprobs.token_logprobs == [-0.25, -0.5]
    top = schemas.TopLogprob(token="c", logprob=-1.5, bytes=[99])
    content = schemas.ChoiceLogprobs(content=[schemas.TokenLogprob(
        token="b", logprob=-0.5, bytes=[98], top_logprobs=[top])])
    chat = oac.ChatCompletion.model_validate_json(schemas.ChatCompletion(**base, usage=usage,
        choices=[schemas.ChatChoice(message=schemas.AssistantMessage(content="b"),
                                    logprobs=content, finish_reason="stop")]).model_dump_json())
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].logprob == -1.5
    chunk = oac.ChatCompletionChunk.model_validate_json(schemas.ChatCompletionChunk(
        **base, choices=[schemas.ChatChunkChoice(delta=schemas.Delta(content="b"),
                                                 logprobs=content, finish_reason=None)]
    ).model_dump_json())
    assert chunk.choices[0].logprobs.content[0].bytes == [98]
