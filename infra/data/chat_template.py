"""Chat templates as transformers renders them: Jinja in the sandbox `apply_chat_template`
uses (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls), the globals
templates use (`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML), the
tokenizer's special tokens as text, `{% generation %}` spans, and `BUILTIN_TEMPLATE` for
tokenizers without one of their own.

This module compiles and renders in the calling process, with no bound on time or memory, and
even compiling is not safe: Jinja evaluates constant expressions and filters while compiling
(`{{ 'x' * 10**10 }}` allocates 10 GB in the process that merely parses it). So callers use
`infra.data.template_sandbox` (worker processes with those bounds), which runs this module.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

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


MAX_TEMPLATE_CHARS = 2**20  # real templates are a few KB; parsing is the caller's own time


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """A Jinja template in the sandbox transformers uses, with `{% generation %}` support
    (DataError for one that does not parse, is too large, or nests too deeply to parse)."""
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
    fix = "fix data.chat_template or the tokenizer's chat_template"
    if len(source) > MAX_TEMPLATE_CHARS:
        raise DataError(f"the chat template has {len(source):,} characters, more than "
                        f"{MAX_TEMPLATE_CHARS:,}; {fix}")
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                        f"{fix}") from None
    except (RecursionError, MemoryError):
        raise DataError(f"the chat template nests too deeply to parse; {fix}") from None


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
    except MemoryError:
        raise TemplateRejected("the chat template runs out of memory on this conversation "
                               "(its renderer's memory is bounded)") from None
    except RecursionError:
        raise TemplateRejected("the chat template recurses too deeply on this "
                               "conversation") from None
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
