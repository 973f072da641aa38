"""Chat templates render as transformers' `apply_chat_template` does; serve names its missing
dependencies in one line."""

from __future__ import annotations

import json

import pytest

from infra.data import chat
from infra.errors import UserError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3ISH = ("{{ bos_token }}{% for message in messages %}"
             "{% if message['role'] == 'system' and not loop.first %}"
             "{{ raise_exception('system first') }}{% endif %}"
             "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
             "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
             "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
             "{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief. ünïcode"},
            {"role": "user", "content": "  What is 2+2? "},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize("template", [CHATML, LLAMA3ISH], ids=["chatml", "llama3-like"])
def test_render_equals_transformers(template, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from infra.data.tokenizer import load_tokenizer
    from tests import hf_models

    directory = hf_models.train_tokenizer(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = template
    for generation_prompt in (True, False):
        ref = tok.apply_chat_template(MESSAGES, tokenize=False,
                                      add_generation_prompt=generation_prompt)
        ours = chat.render(MESSAGES, template, add_generation_prompt=generation_prompt,
                           bos_token="<s>", eos_token="</s>")
        assert ours == ref
    # the template is found in tokenizer_config.json, as transformers saves it
    tok.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    if "chat_template" not in config:  # newer transformers write chat_template.jinja
        assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    assert chat.template_of(load_tokenizer(str(tmp_path / "saved"))) == template


def test_template_errors_and_the_default():
    with pytest.raises(chat.TemplateError, match="system first"):
        chat.render(MESSAGES[1:] + MESSAGES[:1], LLAMA3ISH)
    with pytest.raises(chat.TemplateError):
        chat.render(MESSAGES, "{% for %}")
    from infra.data.tokenizer import ByteTokenizer

    assert chat.template_of(ByteTokenizer()) == chat.DEFAULT_TEMPLATE
    assert chat.render(MESSAGES[1:2], chat.DEFAULT_TEMPLATE) == \
        "<|user|>\n  What is 2+2? \n<|assistant|>\n"


def test_serve_names_missing_dependencies(monkeypatch):
    import importlib.util

    from infra.serve import cli as serve_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(UserError, match=r'serving needs uvicorn: pip install -e "\.\[serve\]"'):
        serve_cli.check_dependencies()
