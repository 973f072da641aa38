"""Supervised fine-tuning: "write the docstring of this function" from the Python stdlib (no download).

    python -m infra train --config experiments/sft.py:docstrings --workdir runs/sft \\
        --config.init.from=runs/tiny-bpe                  # full fine-tuning of a pretrained model
    python -m infra train --config experiments/sft.py:docstrings --workdir runs/sft-lora \\
        --config.init.from=runs/tiny-bpe --config.finetune.lora.rank=8 --config.optim.lr=2e-3

With `init.from` (a workdir of ours or a Hugging Face model directory) the model's architecture
and tokenizer come from the source; this file supplies data and training settings. Examples are
functions of the standard library's packages: the prompt is a function's source without its
docstring, the completion its docstring; held out by module (infra/data/docstrings.py). Your
own data: `--config.data.source=jsonl --config.data.train_files=train.jsonl
[--config.data.eval_files=val.jsonl]` with `{"messages": [...]}` or `{"prompt", "completion"}`
lines.
"""

from infra.config import base_config

VARIANTS = {
    "smoke": "byte-level tiny model, packed docstring examples; seconds on 8 CPU devices",
    "docstrings": "full fine-tuning of lm.py:tiny-sized models (use init.from), 200 steps",
    "docstrings_lora": "the same with LoRA rank 8 on attn/(q|k|v|o) (lr 2e-3)",
}

TINY = dict(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768,
            max_seq_len=256)
SMOKE = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
             max_seq_len=128)


def get_config(arg: str | None = None):
    variant = arg or "docstrings"
    c = base_config("sft")
    c.data.source = "stdlib_docstrings"
    c.data.val_fraction = 0.1  # of the modules
    if variant == "smoke":
        c.model.update(SMOKE)
        c.data.update(seq_len=128, eval_batches=2)
        c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10)
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.checkpoint.every = 10
        return c
    # Fine-tuning memory is activations: layers scanned and recomputed in the backward pass
    # (XLA:CPU reuses a recomputed layer's buffers only inside a scan), and the logits of a
    # large vocabulary, computed over 4 blocks of the sequence
    c.model.update(TINY, scan_layers=True, remat="full", loss_blocks=4)
    c.data.seq_len = 256
    c.train.update(steps=200, batch_size=32, log_every=10, eval_every=50)
    c.optim.update(lr=3e-4, warmup_steps=20, weight_decay=0.0)
    c.checkpoint.every = 50
    if variant == "docstrings_lora":
        c.finetune.lora.update(rank=8, alpha=16.0, targets="attn/(q|k|v|o)")
        c.optim.lr = 2e-3
    return c
