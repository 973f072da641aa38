"""Tiny Hugging Face Llama-family models built with transformers (torch CPU), saved offline.

Weights are drawn at a realistic scale: HF's default init (N(0, 0.02), norms = 1) makes logits
tiny and hides layout mistakes, so projections are N(0, 1/fan_in), norms U(0.5, 1.5), biases
N(0, 0.5), embeddings N(0, 1).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 320  # model vocabulary; the test tokenizer has 300 tokens (the rest is padding)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

ARCHS = {
    # name: (config class, extra config, tied)
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE), True),
    "llama_untied": ("LlamaConfig", dict(rope_theta=500000.0, attention_bias=True,
                                         mlp_bias=True), False),
    "mistral": ("MistralConfig", dict(rope_theta=1e6, sliding_window=None, head_dim=16), False),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6, use_sliding_window=False), False),
    "qwen3": ("Qwen3Config", dict(rope_theta=1e6, head_dim=24, use_sliding_window=False), True),
    "mixtral": ("MixtralConfig", dict(rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None), False),
    "qwen3_moe": ("Qwen3MoeConfig", dict(rope_theta=1e6, head_dim=24, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=False, use_sliding_window=False), False),
}


def randomize(model, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 2 and "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build(arch: str, seed: int = 0):
    """A randomised transformers model of `arch` (a key of ARCHS)."""
    import torch
    import transformers

    cls_name, extra, tied = ARCHS[arch]
    config = getattr(transformers, cls_name)(**COMMON, **extra, tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    if tied:
        model.tie_weights()
    return model.eval()


def save(model, directory: Path, tokenizer_dir: Path | None = None, **kwargs) -> Path:
    """`save_pretrained` into `directory`, plus the tokenizer files of `tokenizer_dir`."""
    import shutil

    model.save_pretrained(directory, **kwargs)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copyfile(f, directory / f.name)
    return directory


def train_tokenizer(directory: Path) -> Path:
    """A 300-token byte-level BPE trained on a few stdlib files (seconds)."""
    from infra.data.text import default_corpus_files
    from infra.data.tokenizer_cli import train_bpe

    train_bpe(default_corpus_files()[:20], 300, directory / "tokenizer.json")
    return directory


def logits(model, tokens) -> "np.ndarray":  # noqa: F821
    import numpy as np
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
