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


def with_template(directory, template, out):
    import shutil

    shutil.copytree(directory, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return out


@pytest.mark.parametrize("template", [CHATML, LLAMA3ISH], ids=["chatml", "llama3-like"])
def test_prompt_ids_equal_transformers(template, tmp_path):
    """What serving feeds the model for a conversation is what transformers' apply_chat_template
    gives (the generation prompt appended, the template's own BOS)."""
    from transformers import AutoTokenizer

    from infra.data.tokenizer import HFTokenizer
    from tests import hf_models

    directory = with_template(hf_models.train_tokenizer(tmp_path / "bpe"), template,
                              tmp_path / "tok")
    theirs = AutoTokenizer.from_pretrained(str(directory))
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
    ours = HFTokenizer(directory)
    assert chat.template_of(ours) == template  # read from tokenizer_config.json
    assert list(chat.prompt_ids(ours, MESSAGES)) == list(expected)


def test_template_errors_and_the_builtin_template():
    from infra.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    with pytest.raises(chat.TemplateRejected, match="system first"):
        chat.prompt_ids(tok, MESSAGES[1:] + MESSAGES[:1], LLAMA3ISH)
    with pytest.raises(UserError, match="does not parse"):
        chat.prompt_ids(tok, MESSAGES, "{% for %}")
    assert chat.template_of(tok) == chat.BUILTIN_TEMPLATE
    ids = chat.prompt_ids(tok, MESSAGES[1:2])  # special tokens' text are those tokens
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "<|user|>\n  What is 2+2? \n<|assistant|>\n"


def test_serve_names_missing_dependencies(monkeypatch):
    import importlib.util

    from infra.serve import cli as serve_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(UserError, match=r'serving needs uvicorn: pip install -e "\.\[serve\]"'):
        serve_cli.check_dependencies()
