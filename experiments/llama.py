"""Released Llama-family models (published configs: exact vocabulary, RoPE, eps, tying, GQA).

    python -m infra plan --config experiments/llama.py:llama3.1-8b --devices 64 --mesh fsdp=64
    python -m infra hf import ~/models/Llama-3.2-1B --workdir runs/llama1b --config experiments/llama.py:llama3.2-1b
    python -m infra train --config experiments/llama.py:llama3.2-1b --workdir runs/ft \\
        --config.init.from=runs/llama1b --config.data.files='my_docs/**/*.txt'

`hf import` of these checkpoints needs no options (their config.json gives the same model.*); with
`init.from` a run starts from the released weights and tokenizer. `smoke` is a tiny model of the
Llama 3.1 architecture (llama3 RoPE scaling, GQA, untied) on byte-level text, for CI.
"""

from infra.config import base_config

VARIANTS = {
    "smoke": "tiny Llama-3.1-style model (llama3 RoPE, GQA, untied) on bytes; seconds on 8 CPU devices",
    "llama3.2-1b": "Llama-3.2-1B: 128,256 vocab, tied, llama3 RoPE x32",
    "llama3.1-8b": "Llama-3.1-8B: 128,256 vocab, untied, llama3 RoPE x8",
    "qwen2.5-0.5b": "Qwen2.5-0.5B: 151,936 vocab, tied, q/k/v biases",
    "mixtral-8x7b": "Mixtral-8x7B: 32,000 vocab, 8 experts of 14,336 (top 2) in every layer",
    "qwen3-30b-a3b": "Qwen3-30B-A3B: 151,936 vocab, 128 experts of 768 (top 8), q/k norm",
}

LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_len=8192)
MODELS = {
    "smoke": dict(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=192, max_seq_len=128, norm_eps=1e-5,
                  tie_embeddings=False, **LLAMA3_ROPE | dict(rope_factor=8.0,
                                                             rope_original_max_len=64)),
    "llama3.2-1b": dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, mlp_dim=8192, max_seq_len=131072,
                        norm_eps=1e-5, tie_embeddings=True, rope_factor=32.0, **LLAMA3_ROPE),
    "llama3.1-8b": dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, mlp_dim=14336, max_seq_len=131072,
                        norm_eps=1e-5, tie_embeddings=False, rope_factor=8.0, **LLAMA3_ROPE),
    "qwen2.5-0.5b": dict(vocab_size=151936, d_model=896, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, mlp_dim=4864, max_seq_len=32768,
                         norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True,
                         qkv_bias=True),
    "mixtral-8x7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, mlp_dim=14336, max_seq_len=32768,
                         norm_eps=1e-5, rope_theta=1000000.0, tie_embeddings=False,
                         num_experts=8, experts_per_token=2, moe_intermediate_size=14336,
                         norm_topk_prob=True),
    "qwen3-30b-a3b": dict(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32,
                          num_kv_heads=4, head_dim=128, mlp_dim=6144, max_seq_len=40960,
                          norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=False,
                          qk_norm=True, num_experts=128, experts_per_token=8,
                          moe_intermediate_size=768, norm_topk_prob=True),
}


def get_config(arg: str | None = None):
    variant = arg or "smoke"
    c = base_config()
    c.model.update(MODELS[variant])
    if variant == "smoke":
        c.data.seq_len = 64
        c.data.eval_batches = 2
        c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10)
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.checkpoint.every = 10
        return c
    # Fine-tuning / continued pre-training on accelerators: bf16 compute, FSDP, 8k sequences.
    c.model.update(dtype="bfloat16", scan_layers=True, remat="save_dots")
    c.data.seq_len = 8192 if variant.startswith("llama") else 4096
    if c.model.num_experts:  # fine-tuning: the load-balancing loss as the released models trained
        c.model.router_aux_loss = {"mixtral-8x7b": 0.02, "qwen3-30b-a3b": 0.001}[variant]
    c.train.update(steps=2000, batch_size=64, log_every=10, eval_every=200)
    c.optim.update(lr=2e-5, warmup_steps=100, weight_decay=0.0)
    c.mesh.update(data=1, fsdp=-1)
    c.checkpoint.every = 500
    return c
