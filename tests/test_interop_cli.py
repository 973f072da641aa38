"""Hugging Face interop as users run it: the published configs, bad inputs (one line, nothing
written), `init.from`, and the CLI path import -> generate / eval -> fine-tune -> export."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hf_models  # noqa: E402
from helpers import cli  # noqa: E402

from infra import config as config_lib  # noqa: E402
from infra.errors import UserError  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

# The config.json files of the released checkpoints (architecture keys as published).
PUBLISHED = {
    "llama3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "vocab_size": 128256, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001},
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "vocab_size": 128256, "attention_bias": False,
        "mlp_bias": False},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "max_window_layers": 24, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643},
}
PARAMS = {"llama3.2-1b": 1_235_814_400, "llama3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_published_configs_match_the_experiments(variant):
    from flax import nnx

    from infra.interop.hf_config import ARCHITECTURE_KEYS, from_hf
    from infra.models import build_model
    from infra.interop.importer import check_architecture

    config = config_lib.load(f"experiments/llama.py:{variant}")
    imported = from_hf(PUBLISHED[variant])
    check_architecture(config, imported, "config.json")  # what `hf import --config` checks
    assert {k: config.model[k] for k in ARCHITECTURE_KEYS if k in imported} == \
        {k: imported[k] for k in ARCHITECTURE_KEYS if k in imported}
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == PARAMS[variant]


def test_refused_configs_name_the_problem():
    from infra.interop.hf_config import from_hf

    base = PUBLISHED["llama3.1-8b"]
    cases = {
        "GPT2LMHeadModel": {**base, "architectures": ["GPT2LMHeadModel"]},
        "'yarn' is not supported": {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "gelu": {**base, "hidden_act": "gelu"},
        "partial_rotary_factor": {**base, "partial_rotary_factor": 0.5},
    }
    for needle, hf in cases.items():
        with pytest.raises(UserError, match=needle) as e:
            from_hf(hf)
        assert "\n" not in str(e.value)
    # A sliding window caps the sequence length (exact below it) instead of being ignored.
    mistral = {**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "rope_scaling": None, "sliding_window": 4096, "max_position_embeddings": 32768}
    assert from_hf(mistral)["max_seq_len"] == 4096
    with pytest.raises(UserError, match="init.from '/nonexistent' is neither"):
        config_lib.load("experiments/lm.py:smoke", {"init.from": "/nonexistent"})


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_are_refused_in_one_line_and_nothing_is_written(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from infra.interop.importer import import_hf

    def broken(name, change) -> Path:
        d = _broken_copy(llama_dir, tmp_path / name)
        change(d)
        return d

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    def wrong_shape(d):
        tensors = load_file(d / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors[
            "model.layers.1.mlp.up_proj.weight"][:-1]
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})

    def edit_config(**changes):
        def change(d):
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, **changes}))
        return change

    cases = {
        "missing": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        "truncated": (truncate, "is truncated"),
        "shape": (wrong_shape, "has shape [127, 64] but config.json implies [128, 64]"),
        "arch": (edit_config(architectures=["GPTNeoXForCausalLM"]), "is not supported"),
        "rope": (edit_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                              "rope_theta": 1e4}), "'dynamic' is not supported"),
        "extra": (lambda d: save_file({**load_file(d / "model.safetensors"),
                                       "model.layers.0.self_attn.rotary.extra": np.zeros(2, np.float32)},
                                      d / "model.safetensors", metadata={"format": "pt"}),
                  "refusing to drop weights"),
    }
    for name, (change, needle) in cases.items():
        workdir = tmp_path / f"wd-{name}"
        with pytest.raises(UserError) as e:
            import_hf(broken(name, change), workdir)
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        assert not workdir.exists() and not (tmp_path / f"wd-{name}.importing").exists(), name
    # The experiment's model must be the checkpoint's: the first differing key is named.
    workdir = tmp_path / "wd-config"
    with pytest.raises(UserError, match=r"model.vocab_size is 384 in the config but 320 in"):
        import_hf(llama_dir, workdir, spec="experiments/llama.py:smoke")
    assert not workdir.exists()


def test_cli_refuses_in_one_line(llama_dir, tmp_path):
    d = _broken_copy(llama_dir, tmp_path / "bad")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000])
    p = cli("hf", "import", str(d), "--workdir", str(tmp_path / "wd"), timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "is truncated" in p.stderr, p.stderr
    assert not (tmp_path / "wd").exists()


def test_init_from_loads_parameters_onto_the_runs_mesh(llama_dir, tmp_path):
    """init.from an HF dir, from an imported workdir, and training in the imported workdir all
    start from the checkpoint's exact parameters (fresh optimizer, step 0) on an fsdp mesh."""
    from infra import train
    from infra.checkpoint import Checkpointer
    from infra.interop.importer import import_hf

    imported = import_hf(llama_dir, tmp_path / "imported")
    overrides = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "train.batch_size": 8,
                 "data.seq_len": 32, "model.scan_layers": True}
    reference = None
    for source, workdir in ((str(llama_dir), tmp_path / "a"), (str(imported), tmp_path / "b"),
                            ("", imported)):
        config = config_lib.load("experiments/lm.py:smoke", {**overrides, "init.from": source}
                                 if source else overrides)
        if not source:  # training in the imported workdir: its own config
            config = config_lib.load_saved(imported)
            config.unlock()
            config.update_from_flattened_dict(overrides)
            config.lock()
        assert config.model.vocab_size == 320 and config.model.qkv_bias  # the source's model
        assert config.model.max_seq_len == 128  # its context, not the experiment's 64
        assert config.data.tokenizer  # and its tokenizer
        trainer = train.build(config)
        ckpt = Checkpointer(workdir, every=10, keep=1)
        try:
            state, _, _ = train._resume_or_start(trainer, ckpt, Path(workdir))
        finally:
            ckpt.close()
        assert int(state["step"]) == 0
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state["opt_state"])
                   if x.ndim)
        params = state["params"]
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(trainer.state.abstract["params"])):
            assert got.sharding == want.sharding
        if reference is None:  # streamed from the HF directory
            reference = params
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params,
                                         reference))
    # LoRA from the imported (loop layout) workdir into this scanned run: the base is the
    # checkpoint's, the adapters those a fresh start draws (the base's draws skipped)
    from infra.models import lora

    config = config_lib.load("experiments/lm.py:smoke", {
        **overrides, "init.from": str(imported), "finetune.lora.rank": 4})
    trainer = train.build(config)
    ckpt = Checkpointer(tmp_path / "c", every=10, keep=1)
    try:
        state, _, _ = train._resume_or_start(trainer, ckpt, tmp_path / "c")
    finally:
        ckpt.close()
    base, adapters = lora.split(state["params"])
    fresh = lora.split(trainer.state.init(jax.random.key(config.train.seed))["params"])[1]
    for got, want in ((base, reference), (adapters, fresh)):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))


@pytest.mark.slow
def test_import_generate_eval_finetune_export_cli(llama_dir, tmp_path):
    """The README's Interop commands, as subprocesses."""
    import torch
    import transformers

    imported, run, out = tmp_path / "imported", tmp_path / "ft", tmp_path / "export"
    p = cli("hf", "import", str(llama_dir), "--workdir", str(imported), "--config.mesh.fsdp=8",
            "--config.mesh.data=1")
    assert p.returncode == 0, p.stderr
    p = cli("generate", "--workdir", str(imported), "--prompt", "import os", "--json",
            "--max_new_tokens", "8", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(result) >= {"text", "token_ids"} and 1 <= len(result["token_ids"]) <= 8
    p = cli("eval", "--workdir", str(imported))
    assert p.returncode == 0, p.stderr
    assert np.isfinite(json.loads(p.stdout.strip().splitlines()[-1])["eval/loss"])
    p = cli("train", "--config", "experiments/lm.py:smoke", "--workdir", str(run),
            f"--config.init.from={imported}", "--config.train.steps=4",
            "--config.train.eval_every=4", "--config.checkpoint.every=4")
    assert p.returncode == 0, p.stderr
    p = cli("hf", "export", "--workdir", str(run), "--out", str(out))
    assert p.returncode == 0, p.stderr
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_two_processes_each_read_only_their_slices(llama_dir, tmp_path):
    """`hf import` as 2 processes x 4 devices with the weights split over all 8 (fsdp): each
    process reads about half of the checkpoint, and the result equals a 1-process import."""
    import re
    import subprocess

    from helpers import ROOT
    from infra.checkpoint import restore_params
    from infra.interop.importer import import_hf
    from infra.run import abstract_params

    mp = tmp_path / "two"
    p = subprocess.run(
        [sys.executable, "scripts/launch_local.py", "--processes", "2", "--devices-per-process",
         "4", "--", "hf", "import", str(llama_dir), "--workdir", str(mp),
         "--config.mesh.data=1", "--config.mesh.fsdp=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    read = {int(m[0]): (float(m[1]), float(m[2])) for m in re.findall(
        r"process (\d) of 2: read ([\d.]+) MiB of the checkpoint's ([\d.]+) MiB", p.stdout + p.stderr)}
    assert set(read) == {0, 1}, p.stdout + p.stderr
    for got, total in read.values():
        assert 0.4 * total < got < 0.6 * total, read  # its half (+ the small replicated norms)
    one = import_hf(llama_dir, tmp_path / "one")
    config = config_lib.load_saved(one)
    abstract = abstract_params(config)
    a, b = restore_params(one, abstract)[0], restore_params(mp, abstract)[0]
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
