"""Fine-tuning as users run it (CLI in subprocesses): a LoRA SFT run of a small random Hugging
Face model imported with `init.from`, resumed bit-exactly after SIGKILL, the same on other mesh
presets, exported merged (transformers) and as a PEFT adapter (peft), and bad input refused with
one line and nothing written."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests import hf_models
from tests.helpers import cli, kill_when, popen
from tests.test_reliability import assert_bit_identical, committed, saved_state, train_losses

pytestmark = pytest.mark.slow
os.environ["HF_HUB_OFFLINE"] = "1"

STEPS = 12
TARGETS = "attn/(q|k|v|o)|mlp/(gate|up|down)"


def chat_examples(n: int, seed: int) -> str:
    r = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(x) for x in r.integers(0, 100, 2))
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model directory with a BPE tokenizer and no chat template, training arguments)."""
    root = tmp_path_factory.mktemp("sft")
    hf_dir = hf_models.save(hf_models.build("llama"), root / "hf",
                            hf_models.train_tokenizer(root / "tok"))
    (root / "train.jsonl").write_text(chat_examples(96, 0))
    (root / "val.jsonl").write_text(chat_examples(16, 1))
    args = ("--config", "experiments/sft.py:smoke", "--config.data.source=jsonl",
            f"--config.data.train_files={root / 'train.jsonl'}",
            f"--config.data.eval_files={root / 'val.jsonl'}", f"--config.init.from={hf_dir}",
            "--config.finetune.lora.rank=4", f"--config.finetune.lora.targets={TARGETS}",
            f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.eval_every=6", "--config.checkpoint.every=3",
            "--config.sharding.print_table=false")
    return hf_dir, args


def compiled(straight_workdir):
    """The environment of a run that shares the straight run's compilation cache: the straight
    run compiles from scratch and writes it, a kill/resume of the same run loads its programs
    (the directory itself: JAX's keys depend on where the cache is)."""
    return {"INFRA_COMPILE_CACHE": str(straight_workdir.parent / "compile-cache")}


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    p = cli("train", *setup[1], "--workdir", str(workdir), env=compiled(workdir))
    assert p.returncode == 0, p.stderr
    assert "sft train data: 96 examples (96 kept)" in p.stdout and "packed into" in p.stdout
    return workdir


def test_sigkill_mid_fine_tune_resumes_with_a_bit_identical_loss_history(setup, straight, tmp_path):
    workdir = tmp_path / "killed"
    proc = popen("train", *setup[1], "--workdir", str(workdir), env=compiled(straight))
    # killed between checkpoints, once one is committed: the resume redoes some steps
    kill_when(lambda: (workdir / "metrics.jsonl").exists() and committed(workdir)
              and any(s > committed(workdir)[-1] for s, _ in train_losses(workdir)), proc)
    assert any(s < STEPS for s, _ in train_losses(workdir))
    p = cli("train", *setup[1], "--workdir", str(workdir), env=compiled(straight))
    assert p.returncode == 0, p.stderr
    assert "resumed from step" in p.stderr
    assert train_losses(workdir) == train_losses(straight)  # bit-identical floats
    assert_bit_identical(saved_state(workdir, STEPS), saved_state(straight, STEPS))


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_mesh_presets_fine_tune_the_same(setup, straight, tmp_path, preset):
    p = cli("train", *setup[1], "--workdir", str(tmp_path / preset),
            f"--config.sharding.preset={preset}", "--config.checkpoint.every=100")
    assert p.returncode == 0, p.stderr
    ref = np.array([v for _, v in train_losses(straight)])  # the default mesh: dp over 8 devices
    got = np.array([v for _, v in train_losses(tmp_path / preset)])
    assert len(got) == len(ref) == STEPS
    diff = float(np.max(np.abs(got - ref) / np.abs(ref)))
    print(f"{preset}: max relative loss difference vs dp {diff:.2e}")
    assert diff <= 1e-4


def our_logits(workdir, tokens):
    """The fine-tuned LoRA model's logits (ours), from the newest checkpoint."""
    from infra import config as config_lib
    from infra import train
    from infra.checkpoint import restore_params

    trainer = train.build(config_lib.load_saved(workdir))
    # a relative path, as `--config.init.from=runs/x` passes it
    params, _ = restore_params(os.path.relpath(workdir), trainer.state.abstract["params"])
    return np.asarray(trainer.state.model.merge(params)(tokens)), params


def test_lora_run_exports_merged_and_as_peft_adapter(setup, straight, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, _ = setup
    tokens = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int32)
    ours, params = our_logits(straight, tokens)

    # the base in the checkpoint is still the imported model, bit for bit
    from infra.interop.hf_weights import tensor_maps
    from infra.models import lora

    base = jax.device_get(lora.split(params)[0])
    reference = {k: v.numpy() for k, v in hf_models.build("llama").state_dict().items()}
    compared = 0
    for m, leaf in zip(tensor_maps(base, 2), jax.tree.leaves(base)):
        for layer, name in enumerate(m.names):
            if name in reference:
                np.testing.assert_array_equal(m.to_hf(leaf[layer] if m.stacked else leaf),
                                              reference[name])
                compared += 1
    assert compared == len(reference) - ("lm_head.weight" in reference)

    p = cli("hf", "export", "--workdir", str(straight), "--out", str(tmp_path / "plain"))
    assert p.returncode == 2 and "pass --merge_lora" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "plain").exists()

    p = cli("hf", "export", "--workdir", str(straight), "--out", str(tmp_path / "merged"),
            "--merge_lora")
    assert p.returncode == 0, p.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    diff = np.max(np.abs(hf_models.logits(merged, tokens) - ours))
    print(f"merged export vs our LoRA model: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    config = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert "{% generation %}" in config["chat_template"]  # the template it was trained with

    p = cli("hf", "export", "--workdir", str(straight), "--out", str(tmp_path / "adapter"),
            "--peft")
    assert p.returncode == 0, p.stderr
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16.0
    assert adapter["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                         "q_proj", "up_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)  # (r, in), (out, r)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), tmp_path / "adapter")
    diff = np.max(np.abs(hf_models.logits(peft_model.eval(), tokens) - ours))
    print(f"PEFT adapter on the base vs our LoRA model: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("case, extra, message", [
    ("malformed-jsonl", ("--config.data.train_files={bad}",), "bad.jsonl:2: not valid JSON"),
    ("rejected-role", ("--config.data.train_files={tool}",),
     "tool.jsonl:1: the chat template rejects this conversation: role 'tool' is not one of"),
    ("no-target", ("--config.finetune.lora.targets=attn/qkv",),
     "finetune.lora.targets 'attn/qkv' matches no adaptable parameter"),
    ("rank-0", ("--config.finetune.lora.rank=0",),
     "finetune.lora.rank must be a positive integer (leave it unset for full fine-tuning), got 0"),
    ("rank-above-the-weights", ("--config.finetune.lora.rank=100000",),
     "finetune.lora.rank=100000 is larger than blocks"),
    # a template is code from elsewhere: one that never finishes fails its example, in bounded time
    ("looping-template", ("--config.data.chat_template={loop}",),
     "good.jsonl:1: the chat template did not finish rendering within 2 s"),
])
def test_bad_fine_tuning_input_is_one_line_and_writes_nothing(tmp_path, case, extra, message):
    bad, tool = tmp_path / "bad.jsonl", tmp_path / "tool.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    tool.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    loop = tmp_path / "loop.jinja"
    loop.write_text("{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}"
                    "{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}")
    good = tmp_path / "good.jsonl"
    good.write_text(chat_examples(40, 0))
    workdir = tmp_path / "w"
    p = cli("train", "--config", "experiments/sft.py:smoke", "--workdir", str(workdir),
            "--config.data.source=jsonl", f"--config.data.train_files={good}",
            f"--config.data.eval_files={good}", "--config.finetune.lora.rank=4",
            *(e.format(bad=bad, tool=tool, loop=loop) for e in extra))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert not workdir.exists()


def test_smoke_command_includes_sft():
    from infra import config as config_lib

    assert "sft.py" in [p.name for p in config_lib.list_experiment_files()]
    c = config_lib.load("experiments/sft.py:smoke")
    assert c.task == "sft" and c.data.source == "stdlib_docstrings"
