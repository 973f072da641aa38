"""What evaluation and RL clients ask the server for: `logprobs` / `top_logprobs`, `echo`, `n`,
several prompts per call, checked against transformers and with lm-evaluation-harness.

A tiny Hugging Face Llama (random weights at a realistic scale, a 300-token BPE) is imported
and served by the real CLI on 1 CPU device; the same directory is the reference for
transformers and for lm-evaluation-harness's own `hf` model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.test_serve_http import Server

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
NAME = "tiny"
TOK = None  # the checkpoint's tokenizer (`tokenizers`), set by the fixture


@pytest.fixture(scope="module", autouse=True)
def reference_tokenizer(llama_dir):
    import tokenizers

    global TOK
    TOK = tokenizers.Tokenizer.from_file(str(llama_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    from infra.interop.importer import import_hf

    workdir = import_hf(llama_dir, tmp_path_factory.mktemp("logprobs") / "wd")
    s = Server(workdir, slots=4, max_queue=16, name=NAME)
    yield s
    out, err = s.stop()
    assert s.proc.returncode == 0, err[-3000:]


def reference_logprobs(hf_model, ids: list[int]) -> np.ndarray:
    """transformers' float32 log-softmax over `ids`: row i predicts ids[i + 1]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


@pytest.mark.slow
def test_echo_and_logprobs_equal_transformers(server, hf_model):
    """`echo` + `logprobs` (what a log-likelihood evaluation reads): every prompt token's
    log-probability and the completion's equal transformers' full forward pass over prompt +
    completion; the alternatives are the likeliest ids, sorted, the chosen one among them."""
    c = server.client
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 300, 23)]
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                             logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 5 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.usage.prompt_tokens == len(prompt)  # token ids are taken as they are: no BOS added

    greedy = hf_model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                               min_new_tokens=5)[0, len(prompt):].tolist()
    ids = prompt + greedy
    for got, token in zip(lp.tokens, ids):  # part of a character: OpenAI's "bytes:\\x.."
        text = TOK.decode([token], skip_special_tokens=False)
        assert got == text or ("\ufffd" in text and got.startswith("bytes:\\x")), (got, text)
    ref = reference_logprobs(hf_model, ids)
    expected = [ref[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        values = sorted(top.values(), reverse=True)
        assert 3 <= len(top) <= 4  # the 3 likeliest, and the chosen token if not among them
        drawable = ref[i - 1, 1:300]  # not PAD (0), not the padding of the vocabulary
        np.testing.assert_allclose(values[:3], np.sort(drawable)[::-1][:3], atol=1e-4)
        if i >= len(prompt):  # greedy completion tokens: the likeliest
            assert lp.token_logprobs[i] == pytest.approx(values[0], abs=1e-6)
    text = TOK.decode(prompt)
    assert r.choices[0].text == text + TOK.decode(greedy)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(prompt)] == len(text)


@pytest.mark.slow
def test_prompt_only_scoring_and_several_prompts(server, hf_model):
    """`max_tokens` 0 with `echo` scores prompts without generating; several prompts in one
    call come back as choices in order."""
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 300, n)] for n in (5, 17, 40)]
    r = server.client.completions.create(model=NAME, prompt=prompts, max_tokens=0, echo=True,
                                         logprobs=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == 62
    for choice, ids in zip(r.choices, prompts):
        assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == len(ids)
        ref = reference_logprobs(hf_model, ids)
        np.testing.assert_allclose(choice.logprobs.token_logprobs[1:],
                                   [ref[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)


@pytest.mark.slow
def test_chat_logprobs_and_top_logprobs(server):
    c = server.client
    messages = [{"role": "user", "content": "the quick brown fox"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    text = b"".join(bytes(t.bytes) for t in content).decode(errors="replace")
    assert content and text == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert t.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy: the likeliest
        assert t.token == t.top_logprobs[0].token and t.bytes == t.top_logprobs[0].bytes
    plain = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content
    # streamed: the same tokens and log-probabilities, chunk by chunk
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=4,
                                            stream=True))
    streamed = [t for ch in chunks for choice in ch.choices if choice.logprobs
                for t in choice.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    # (the second call reuses the first's cached prompt pages: the same values up to rounding)
    np.testing.assert_allclose([t.logprob for t in streamed], [t.logprob for t in content],
                               atol=1e-5)


@pytest.mark.slow
def test_n_seeded_completions_differ_and_repeat(server):
    c = server.client
    ask = dict(model=NAME, prompt="the quick", max_tokens=12, temperature=1.0, seed=7, n=4,
               logprobs=0)
    first = c.completions.create(**ask)
    again = c.completions.create(**ask)
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in first.choices] == [0, 1, 2, 3]
    assert len(set(texts)) == 4, texts
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]
    assert first.usage.prompt_tokens == again.usage.prompt_tokens < first.usage.completion_tokens
    # choice 0 is the request with that seed alone; the stream gives the same four texts
    alone = c.completions.create(**{**ask, "n": 1})
    assert alone.choices[0].text == texts[0]
    chunks = list(c.completions.create(**ask, stream=True))
    streamed = [""] * 4
    for ch in chunks:
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts


MC = [  # question, choices, answer: contents do not matter, both models read the same tokens
    ("the quick brown", [" fox", " dog", " cat"], 0),
    ("import os\nimport", [" sys", " re", " json", " time"], 1),
    ("def main():\n   ", [" return", " pass", " print"], 2),
    ("for i in", [" range", " list"], 0),
    ("class Foo", ["(object):", ":", "(Base):"], 1),
    ("x = [1, 2,", [" 3]", " 4]", " 5]"], 0),
]


@pytest.mark.slow
def test_lm_evaluation_harness_gives_the_same_accuracy_as_its_hf_model(server, llama_dir,
                                                                       tmp_path):
    """lm-evaluation-harness's `local-completions` model against the server and its own `hf`
    model on the same checkpoint: the same accuracy, the same log-likelihood per choice."""
    lm_eval = pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in MC))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(f"""
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    common = dict(tasks=["tiny_mc"], task_manager=tasks, log_samples=True, batch_size=1)
    ours = lm_eval.simple_evaluate(
        model="local-completions", model_args=(
            f"model={NAME},base_url={server.base}/v1/completions,tokenizer={llama_dir},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,add_bos_token=True"),
        **common)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={llama_dir},"
                                     "dtype=float32,add_bos_token=True", device="cpu", **common)

    def logliks(result):
        return [r[0] for s in sorted(result["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
                for r in s["filtered_resps"]]

    assert len(logliks(ours)) == sum(len(c) for _, c, _ in MC)
    np.testing.assert_allclose(logliks(ours), logliks(theirs), atol=1e-3)
    acc = lambda result: result["results"]["tiny_mc"]["acc,none"]  # noqa: E731
    assert acc(ours) == acc(theirs)
