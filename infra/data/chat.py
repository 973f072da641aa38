"""Chat templates: a list of messages -> the prompt text the model was trained on.

Hugging Face tokenizer directories carry a Jinja template (`chat_template` in
tokenizer_config.json, or a `chat_template.jinja` file); `render` evaluates it as transformers'
`apply_chat_template` does: a sandboxed, immutable Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, a `tojson` that keeps
non-ASCII text, and `{% generation %}` blocks (assistant masks) rendered as their body. The
special tokens' text (`bos_token`, `eos_token`, ...) are template variables.

A tokenizer without a template (the byte-level default, a BPE trained here) gets
`DEFAULT_TEMPLATE`, one line per role marker: `<|user|>\\n...\\n<|assistant|>\\n`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TemplateError(ValueError):
    """The template cannot be rendered for these messages (raise_exception, a Jinja error)."""


def template_of(tokenizer) -> str:
    """The chat template of a tokenizer from `infra.data.tokenizer.load_tokenizer`:
    tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default"),
    else a `chat_template.jinja` beside it, else `DEFAULT_TEMPLATE`."""
    directory = getattr(tokenizer, "directory", None)
    if directory is None:
        return DEFAULT_TEMPLATE
    directory = Path(directory)
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    return DEFAULT_TEMPLATE


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: the body, rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


_TEMPLATES: dict[str, Any] = {}


def render(messages: list[dict], template: str, add_generation_prompt: bool = True,
           **variables) -> str:
    """The prompt text of `messages` ([{"role", "content"}, ...]) under `template`;
    `variables`: bos_token, eos_token, tools, ... as the template expects them."""
    import jinja2

    try:
        compiled = _TEMPLATES.get(template)
        if compiled is None:
            compiled = _TEMPLATES[template] = _environment().from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **variables)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template: {e}") from None


def special_tokens(tokenizer) -> dict[str, str]:
    """bos_token / eos_token / pad_token text of a tokenizer, for templates that print them."""
    out = {}
    inner = getattr(tokenizer, "_tok", None)
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_id", None)
        if inner is not None and token_id is not None:
            out[f"{kind}_token"] = inner.id_to_token(token_id) or ""
        else:
            out[f"{kind}_token"] = ""
    return out
