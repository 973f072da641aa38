"""Hugging Face interop against the reference implementation (transformers on torch CPU), offline.

Tiny random models of each supported architecture are built and saved with `save_pretrained`
in the test (tests/hf_models.py); our logits must equal transformers' within 1e-4 (float32), on
1 device and on 8 emulated devices (fsdp x tensor), in both layer layouts, and greedy decoding
must produce the same tokens. Round trips (import -> export -> from_pretrained) are bit-exact.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hf_models  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

TOLERANCE = 1e-4
MAX_DIFF: dict[str, float] = {}  # printed at the end (the issue note quotes them)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module")
def tok_dir(root) -> Path:
    d = root / "tokenizer"
    d.mkdir()
    return hf_models.train_tokenizer(d)


_MODELS: dict[str, tuple] = {}


def hf_model(arch: str, root: Path, tok_dir: Path):
    """(transformers model, its saved directory, our imported workdir), built once per arch."""
    if arch not in _MODELS:
        from infra.interop.importer import import_hf

        model = hf_models.build(arch)
        directory = hf_models.save(model, root / arch, tok_dir)
        workdir = import_hf(directory, root / f"wd-{arch}")
        _MODELS[arch] = (model, directory, workdir)
    return _MODELS[arch]


def our_logits(workdir: Path, tokens: np.ndarray, *, devices: int, scan: bool,
               mesh: dict | None = None, source: Path | None = None) -> np.ndarray:
    """Our model's logits with the imported parameters, on the first `devices` devices; the
    parameters stream from the HF directory `source` if given, else from the workdir."""
    import optax

    from infra import config as config_lib
    from infra import mesh as mesh_lib
    from infra import sharding
    from infra.checkpoint import restore_params
    from infra.interop.importer import load_hf_params
    from infra.state import shard_state
    from infra.tasks import get_task, logical_rules

    config = config_lib.load_saved(workdir)
    config.unlock()
    config.model.scan_layers = scan
    config.mesh.update(mesh or {"data": 1})
    config.lock()
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:devices])
    rules = sharding.normalize_rules(logical_rules(config), mesh)
    sharded = shard_state(get_task(config).build_model, optax.identity(), mesh, rules)
    abstract = sharded.abstract["params"]
    params = (load_hf_params(source, config, abstract) if source
              else restore_params(workdir, abstract)[0])
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert leaf.sharding == want.sharding
    with sharding.activation_rules(mesh, rules):
        return np.asarray(jax.jit(lambda p, x: sharded.model.merge(p)(x))(params, tokens))


@pytest.mark.parametrize("arch", list(hf_models.ARCHS))
def test_logits_match_transformers(arch, root, tok_dir):
    model, directory, workdir = hf_model(arch, root, tok_dir)
    tokens = np.random.default_rng(0).integers(0, hf_models.VOCAB, (2, 40))
    ref = hf_models.logits(model, tokens)
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["model"]["tie_embeddings"] == hf_models.ARCHS[arch][2]
    runs = {
        "1 device, loop layers, from the workdir": our_logits(workdir, tokens, devices=1, scan=False),
        "8 devices fsdp=4 tensor=2, scanned layers, streamed from the HF dir": our_logits(
            workdir, tokens, devices=8, scan=True, mesh=dict(data=1, fsdp=4, tensor=2),
            source=directory),
        "8 devices fsdp=8, loop layers": our_logits(
            workdir, tokens, devices=8, scan=False, mesh=dict(data=1, fsdp=8)),
    }
    for what, ours in runs.items():
        diff = float(np.abs(ours - ref).max())
        MAX_DIFF[arch] = max(MAX_DIFF.get(arch, 0.0), diff)
        assert diff < TOLERANCE, (arch, what, diff)
    print(f"\n{arch}: max |logits - transformers| = {MAX_DIFF[arch]:.2e} "
          f"(logits up to {np.abs(ref).max():.1f})")


@pytest.mark.parametrize("arch", list(hf_models.ARCHS))
def test_greedy_generation_matches_transformers(arch, root, tok_dir):
    import torch

    from infra.generate import complete

    model, directory, workdir = hf_model(arch, root, tok_dir)
    prompt = "def main(argv):\n    return"
    out = complete(workdir, prompt, max_new_tokens=32, temperature=0.0)
    from infra.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(workdir / "tokenizer"))
    ids = [tok.bos_id] + list(tok.encode(prompt))
    model.generation_config.eos_token_id = tok.eos_id
    # we never sample BOS, PAD or the vocabulary's padding beyond the tokenizer's ids
    never = [tok.bos_id, tok.pad_id, *range(tok.vocab_size, hf_models.VOCAB)]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             pad_token_id=tok.pad_id, suppress_tokens=never)[0, len(ids):].tolist()
    assert out["token_ids"] == ref, (out, ref)
    assert len(ref) == 32 or ref[-1] == tok.eos_id


def _hf_state(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(directory.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["llama_untied", "qwen3", "mixtral", "qwen3_moe"])
def test_round_trip_is_bit_exact(arch, root, tok_dir):
    import torch
    import transformers

    from infra.interop.exporter import export_hf

    model, directory, workdir = hf_model(arch, root, tok_dir)
    out = export_hf(workdir, root / f"export-{arch}")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name].numpy(), err_msg=name)
    tokens = np.random.default_rng(1).integers(0, hf_models.VOCAB, (2, 24))
    np.testing.assert_array_equal(hf_models.logits(loaded.eval(), tokens),
                                  hf_models.logits(model, tokens))
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == \
        json.loads((directory / "config.json").read_text())["architectures"]


def test_sharded_checkpoint_imports_like_a_single_file(root, tok_dir):
    """save_pretrained's multi-file layout (and ours, from export) import to the same arrays."""
    import jax.numpy as jnp

    from infra.checkpoint import restore_params
    from infra.interop.exporter import export_hf
    from infra.interop.importer import import_hf
    from infra.run import abstract_params
    from infra import config as config_lib

    model, directory, workdir = hf_model("llama_untied", root, tok_dir)
    hf_sharded = hf_models.save(model, root / "llama-hf-sharded", tok_dir, max_shard_size="100KB")
    ours_sharded = export_hf(workdir, root / "llama-our-sharded", max_shard_size=100_000)
    for directory_ in (hf_sharded, ours_sharded):
        assert (directory_ / "model.safetensors.index.json").is_file()
        assert len(list(directory_.glob("model-*-of-*.safetensors"))) > 2
    config = config_lib.load_saved(workdir)
    abstract = abstract_params(config)
    reference = restore_params(workdir, abstract)[0]
    for i, directory_ in enumerate((hf_sharded, ours_sharded)):
        imported = import_hf(directory_, root / f"wd-sharded-{i}")
        params = restore_params(imported, abstract)[0]
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params,
                                         reference))


def test_bfloat16_checkpoint_round_trip(root, tok_dir):
    """bf16 weights import exactly (into float32 parameters) and export back bit for bit."""
    import torch

    from infra.interop.exporter import export_hf
    from infra.interop.importer import import_hf

    model = hf_models.build("qwen2", seed=3).to(torch.bfloat16)
    directory = hf_models.save(model, root / "qwen2-bf16", tok_dir)
    workdir = import_hf(directory, root / "wd-qwen2-bf16")
    out = export_hf(workdir, root / "export-qwen2-bf16", dtype="bfloat16")
    original, exported = _hf_state(directory), _hf_state(out)
    assert original.keys() == exported.keys()
    for name, value in original.items():
        assert value.dtype == exported[name].dtype and str(value.dtype) == "bfloat16"
        np.testing.assert_array_equal(value.view(np.uint16), exported[name].view(np.uint16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_generation_stops_at_the_tokenizers_eos(root, tok_dir):
    """Make the first greedy token the tokenizer's EOS: generation stops right after it."""
    from infra.data.tokenizer import load_tokenizer
    from infra.generate import complete

    _, _, workdir = hf_model("llama", root, tok_dir)
    first = complete(workdir, "x = ", max_new_tokens=4, temperature=0.0)["token_ids"][0]
    tok_config = workdir / "tokenizer" / "tokenizer_config.json"
    saved = tok_config.read_text()
    name = load_tokenizer(str(workdir / "tokenizer"))._tok.id_to_token(first)
    tok_config.write_text(json.dumps({**json.loads(saved), "eos_token": name}))
    load_tokenizer.cache_clear()
    try:
        out = complete(workdir, "x = ", max_new_tokens=4, temperature=0.0)
    finally:
        tok_config.write_text(saved)
        load_tokenizer.cache_clear()
    assert out["token_ids"] == [first] and out["finish_reason"] == "eos" and out["text"] == ""
