"""Chat templates: conversations rendered with the tokenizer's own Jinja template, and which
tokens are the assistant's (the ones supervised fine-tuning learns).

The template is the one in the tokenizer's `tokenizer_config.json` (or `chat_template.jinja`),
rendered the way `transformers`' `apply_chat_template` renders it: a sandboxed Jinja environment
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls), the globals
templates use (`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML), the
tokenizer's special tokens as text (`bos_token`, `eos_token`, ...) and the rendered text
tokenised without added special tokens: the ids equal `apply_chat_template(messages,
tokenize=True)`'s (tests/test_sft.py checks it). Templates from model repositories are code
from elsewhere: Jinja's sandbox keeps them from reaching Python internals
(`infra.data.chat_template`), and they render in worker processes bounded in time, memory and
output (`infra.data.template_sandbox`), so a hostile one fails its own conversation only.

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

from typing import Any

import numpy as np

from infra import paths
from infra.data import template_sandbox
from infra.data.chat_template import BUILTIN_TEMPLATE, TemplateRejected, check_messages
from infra.data.template_sandbox import TemplateSandbox
from infra.errors import ConfigError

__all__ = ["BUILTIN_TEMPLATE", "TemplateRejected", "ChatEncoder", "check_messages", "prompt_ids",
           "run_template", "span_mask", "template_of"]


def template_of(tokenizer, template: str | None = None) -> str:
    """The template a tokenizer's conversations use: `template`, else its own, else
    `BUILTIN_TEMPLATE` (fine-tuning and serving agree on it)."""
    return template or tokenizer.chat_template or BUILTIN_TEMPLATE


def run_template(config: Any, tokenizer) -> str:
    """The template a run's conversations use: the `data.chat_template` file (an SFT run's
    override), else the tokenizer's own, else `BUILTIN_TEMPLATE`. Fine-tuning, serving and
    export all ask here, so a model is served and exported with the format it learnt."""
    location = config.data.get("chat_template", "") if "data" in config else ""
    if not location:
        return template_of(tokenizer)
    try:
        return paths.read_text(location)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read data.chat_template {location!r} "
                          f"({getattr(e, 'strerror', None) or e})",
                          key="data.chat_template", value="<a .jinja file>") from None


def prompt_ids(tokenizer, messages: list[dict], template: str | None = None,
               sandbox: TemplateSandbox | None = None) -> np.ndarray:
    """The token ids a model continues for `messages`: the conversation with the generation
    prompt (rendered in `sandbox`, default the process's shared one), tokenised as fine-tuning
    tokenised it (special tokens' text are those tokens)."""
    source = template_of(tokenizer, template)
    text, _ = (sandbox or template_sandbox.shared()).render(
        source, check_messages(messages), special=dict(tokenizer.special_tokens),
        add_generation_prompt=True)
    return tokenizer.encode_with_offsets([text])[0][0]


def span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens (character `offsets` (n, 2)) that overlap any span, as a bool array."""
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
    return mask


class ChatEncoder:
    """Conversations -> (token ids, assistant mask) with a tokenizer and its template
    (`template` overrides it; neither: `BUILTIN_TEMPLATE`), rendered in `sandbox` (default: the
    process's shared one)."""

    def __init__(self, tokenizer, template: str | None = None,
                 sandbox: TemplateSandbox | None = None):
        self.tokenizer = tokenizer
        self.source = template_of(tokenizer, template)
        self.sandbox = sandbox or template_sandbox.shared()
        self.sandbox.check(self.source)  # a template that does not parse fails here, once

    def render(self, messages: list[dict],
               add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        return self.sandbox.render(self.source, check_messages(messages),
                                   special=dict(self.tokenizer.special_tokens),
                                   add_generation_prompt=add_generation_prompt)

    def encode(self, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int32, assistant mask bool) of each conversation (TemplateRejected / DataError
        for one that cannot be rendered)."""
        rendered = [self.render(m) for m in conversations]
        encoded = self.tokenizer.encode_with_offsets([text for text, _ in rendered])
        return [(ids, span_mask(offsets, spans))
                for (ids, offsets), (_, spans) in zip(encoded, rendered)]
