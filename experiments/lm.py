"""Byte-level decoder-only language model on local text (default: the Python stdlib's source).

    python -m infra train --config experiments/lm.py:tiny --workdir runs/lm-tiny
"""

from infra.config import base_config

VARIANTS = {
    "smoke": "seconds on 8 CPU devices; what tests and `infra smoke` run",
    "tiny": "a few minutes on a laptop CPU; the loss visibly falls (docs/workloads.md)",
    "125m": "GPT-2-small layer shapes (12 x 768) on bytes (bf16), for one accelerator or a small slice",
    "1b": "bf16, FSDP: for a GPU node or a TPU slice",
    "8b": "8B-class: Llama-3-8B layer shapes with the byte-level vocabulary (not the released model: see experiments/llama.py:llama3.1-8b)",
    "moe-smoke": "smoke with 4 experts (top 2) in every layer, dropless: seconds on 8 CPU devices",
    "moe-tiny": "tiny with 8 experts of 384 (top 2): the active parameters of tiny's 768-wide MLP",
    "pipeline-smoke": "smoke with 8 layers in 4 pipeline stages (data=2 x stage=4, 8 microbatches)",
}
# mixture-of-experts variants: the dense variant's config plus these `model.*` keys
MOE = {
    "moe-smoke": ("smoke", dict(num_experts=4, experts_per_token=2, moe_intermediate_size=64,
                                router_aux_loss=0.01, router_z_loss=0.001)),
    "moe-tiny": ("tiny", dict(num_experts=8, experts_per_token=2, moe_intermediate_size=384,
                              router_aux_loss=0.01, router_z_loss=0.001)),
}

MODELS = {
    "smoke": dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=64),
    "tiny": dict(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768, max_seq_len=256),
    "125m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64, mlp_dim=2048, max_seq_len=1024),
    "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192, max_seq_len=2048),
    "8b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336, max_seq_len=4096),
}


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    pipelined = variant == "pipeline-smoke"
    variant, moe = MOE.get(variant, ("smoke" if pipelined else variant, {}))
    c = base_config()
    c.model.update(MODELS[variant], **moe)
    if pipelined:
        c.model.num_layers = 8
        c.mesh.update(data=2, stage=4)
        c.pipeline.microbatches = 8
    if variant == "smoke":
        c.data.seq_len = 64
        c.data.eval_batches = 2
        c.train.update(steps=30, batch_size=16, log_every=5, eval_every=15)
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.checkpoint.every = 10
    elif variant == "tiny":
        c.data.seq_len = 128
        c.train.update(steps=400, batch_size=32, log_every=20, eval_every=100)
        c.optim.update(lr=2e-3, warmup_steps=40)
        c.checkpoint.every = 100
    else:  # accelerator sizes: bf16 compute, parameters and optimizer state sharded (FSDP)
        c.model.dtype = "bfloat16"
        c.data.seq_len = c.model.max_seq_len
        c.train.update(steps=20_000, batch_size=256, log_every=50, eval_every=1000)
        c.optim.update(lr={"125m": 6e-4, "1b": 3e-4, "8b": 2e-4}[variant], warmup_steps=1000)
        c.mesh.update(data=1, fsdp=-1)
        c.checkpoint.every = 1000
    return c
