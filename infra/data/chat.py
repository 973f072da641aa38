"""Chat templates: conversations rendered with the tokenizer's own Jinja template, and which
tokens are the assistant's (the ones supervised fine-tuning learns).

The template is the one in the tokenizer's `tokenizer_config.json` (or `chat_template.jinja`),
rendered the way `transformers`' `apply_chat_template` renders it: a sandboxed Jinja environment
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls), the globals
templates use (`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML), the
tokenizer's special tokens as text (`bos_token`, `eos_token`, ...) and the rendered text
tokenised without added special tokens: the ids equal `apply_chat_template(messages,
tokenize=True)`'s (tests/test_sft.py checks it). Templates from model repositories are code
from elsewhere: the sandbox keeps them from reaching Python internals.

The assistant's tokens are found from the template itself:

* a template that marks them with `{% generation %} ... {% endgeneration %}` (what
  transformers' `return_assistant_tokens_mask` needs) gives exactly those spans;
* any other template is rendered prefix by prefix: the assistant message i spans what
  rendering messages[:i+1] adds to messages[:i] with the generation prompt (so its end-of-turn
  tokens count as the assistant's, as the model must learn to end its turn). A template that
  does not render conversations as growing prefixes is refused with a one-line fix.

A token belongs to the assistant when its character span overlaps an assistant span (as
transformers' assistant mask decides).

Tokenizers without a template (the byte-level tokenizer, a BPE from `python -m infra tokenizer
train`) use `BUILTIN_TEMPLATE`::

    <|bos|><|system|>
    You are terse.
    <|user|>
    Hi
    <|assistant|>
    Hello.<|eos|><|user|>
    ...

role markers as plain text, each assistant turn ended by EOS (so generation stops there), a
generation prompt `<|assistant|>\\n`; roles other than system / user / assistant are refused.
`hf export` writes it into the exported `tokenizer_config.json`, so transformers renders
conversations for the exported model the way it was trained.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import numpy as np

from infra.errors import DataError

BUILTIN_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception(\"role '\" ~ message['role'] ~ \"' is not one of system, user, "
    "assistant\") -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] ~ eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] ~ '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
_START, _END = "\ue000", "\ue001"  # private-use characters marking {% generation %} output
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateRejected(DataError):
    """The template refused a conversation (`raise_exception`, or an error while rendering)."""


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """A Jinja template in the sandbox transformers uses, with `{% generation %}` support."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: the body's output between two markers."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _START + caller() + _END

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix "
                        "data.chat_template or the tokenizer's chat_template") from None


def check_messages(messages: Any) -> list[dict]:
    """A conversation as a list of {"role": str, "content": str} (DataError otherwise)."""
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f'message {i} is not an object with string "role" and "content"')
    return messages


def _render(template, messages: list[dict], add_generation_prompt: bool,
            special: dict[str, str]) -> str:
    import jinja2

    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **special)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateRejected(f"the chat template rejects this conversation: {e}") from None
    except Exception as e:  # noqa: BLE001 - a template is code: any failure is this example's
        raise TemplateRejected(f"the chat template fails on this conversation "
                               f"({type(e).__name__}: {e})") from None


def render(source: str, messages: list[dict], *, special: dict[str, str] | None = None,
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant character spans) of a conversation rendered with template `source`."""
    special = dict(special or {})
    template = compile_template(source)
    messages = check_messages(messages)
    if _GENERATION_TAG.search(source):
        marked = _render(template, messages, add_generation_prompt, special)
        if any(_START in m["content"] or _END in m["content"] for m in messages):
            raise DataError("a message holds the private-use characters U+E000 / U+E001")
        spans, out, pos = [], [], 0
        for piece in re.split(f"([{_START}{_END}])", marked):
            if piece == _START:
                start = pos
            elif piece == _END:
                spans.append((start, pos))
            else:
                out.append(piece)
                pos += len(piece)
        return "".join(out), [s for s in spans if s[1] > s[0]]
    text = _render(template, messages, add_generation_prompt, special)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(template, messages[:i], True, special) if i else ""
        upto = _render(template, messages[: i + 1], False, special)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError("the chat template does not render conversations as growing prefixes, "
                            "so the assistant's tokens cannot be found; add {% generation %} ... "
                            "{% endgeneration %} around assistant content (data.chat_template)")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return text, spans


def template_of(tokenizer, template: str | None = None) -> str:
    """The template a tokenizer's conversations use: `template`, else its own, else
    `BUILTIN_TEMPLATE` (fine-tuning and serving agree on it)."""
    return template or tokenizer.chat_template or BUILTIN_TEMPLATE


def run_template(config: Any, tokenizer) -> str:
    """The template a run's conversations use: the `data.chat_template` file (an SFT run's
    override), else the tokenizer's own, else `BUILTIN_TEMPLATE`. Fine-tuning, serving and
    export all ask here, so a model is served and exported with the format it learnt."""
    from infra import paths
    from infra.errors import ConfigError

    location = config.data.get("chat_template", "") if "data" in config else ""
    if not location:
        return template_of(tokenizer)
    try:
        return paths.read_text(location)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read data.chat_template {location!r} "
                          f"({getattr(e, 'strerror', None) or e})",
                          key="data.chat_template", value="<a .jinja file>") from None


def prompt_ids(tokenizer, messages: list[dict], template: str | None = None) -> np.ndarray:
    """The token ids a model continues for `messages`: the conversation with the generation
    prompt, tokenised as fine-tuning tokenised it (special tokens' text are those tokens)."""
    text = _render(compile_template(template_of(tokenizer, template)), check_messages(messages),
                   True, dict(tokenizer.special_tokens))
    text = text.replace(_START, "").replace(_END, "")
    return tokenizer.encode_with_offsets([text])[0][0]


def span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens (character `offsets` (n, 2)) that overlap any span, as a bool array."""
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
    return mask


class ChatEncoder:
    """Conversations -> (token ids, assistant mask) with a tokenizer and its template
    (`template` overrides it; neither: `BUILTIN_TEMPLATE`)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.source = template_of(tokenizer, template)
        compile_template(self.source)  # a template that does not parse fails here, once

    def render(self, messages: list[dict],
               add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        return render(self.source, messages, special=self.tokenizer.special_tokens,
                      add_generation_prompt=add_generation_prompt)

    def encode(self, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int32, assistant mask bool) of each conversation (TemplateRejected / DataError
        for one that cannot be rendered)."""
        rendered = [self.render(m) for m in conversations]
        encoded = self.tokenizer.encode_with_offsets([text for text, _ in rendered])
        return [(ids, span_mask(offsets, spans))
                for (ids, offsets), (_, spans) in zip(encoded, rendered)]
