"""Post-training with rewards on problems generated in code (no download): SFT for the answer
format, then GRPO with an exact-match reward.

    python -m infra train --config experiments/grpo.py:max-sft --workdir runs/max-sft
    python -m infra train --config experiments/grpo.py:max --workdir runs/max-grpo \\
        --config.init.from=runs/max-sft

`max`: the SFT demonstrations of `max(47,85)=` show the answer's format only (either number, at
random), so the SFT model answers about a third of held-out problems right; GRPO samples
`rl.num_generations` answers per problem and rewards the right one. `arith` is the same with
sums (`47+85=132`), whose SFT demonstrations are right. Eval reports `reward/exact_answer` on
held-out problems (greedy): the exact-match accuracy. Rewards are functions of this file, named
by `rl.rewards` (or dotted paths to any module).
"""

from infra.config import base_config
from infra.data.arithmetic import exact_answer  # noqa: F401 - a reward named by rl.rewards

VARIANTS = {
    "arith-sft": "SFT of a small byte-level model on 2-digit additions (the answer format)",
    "arith": "GRPO from arith-sft (init.from) with the exact-answer reward",
    "max-sft": "SFT on max(a,b)= whose demonstrations show the format only (either number)",
    "max": "GRPO from max-sft (init.from): the exact-answer reward teaches which number",
    "smoke-sft": "a tiny SFT start for the CI smoke test (seconds)",
    "smoke": "GRPO smoke test from smoke-sft (init.from): 4 prompts x 4 completions, 4 steps",
    "dpo-smoke": "DPO smoke test from smoke-sft (init.from): sums chosen over near misses",
}

MODEL = dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=512,
             max_seq_len=64)
SMOKE = dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
             max_seq_len=32)


def digits_only(prompts, completions, **_):
    """A format reward: the completion is a number."""
    return [float(c.strip().isdigit()) for c in completions]


def digit_match(prompts, completions, answer, **_):
    """Partial credit: the share of the answer's digits right, aligned from the units digit
    (a denser signal than the exact answer while few answers are exact)."""
    out = []
    for c, a in zip(completions, answer):
        c = c.strip()
        right = sum(x == y for x, y in zip(reversed(c), reversed(a)))
        out.append(right / max(len(a), len(c), 1))
    return out


def get_config(arg: str | None = None):
    variant = arg or "arith"
    smoke = variant.startswith("smoke")
    op = "max" if variant.startswith("max") else "add"
    if variant == "dpo-smoke":
        c = base_config("dpo")
        c.model.update(SMOKE)
        c.data.update(source="arithmetic", arithmetic_examples=256, seq_len=16,
                      val_fraction=0.1)
        c.rl.beta = 0.1
        c.train.update(steps=4, batch_size=8, log_every=1, eval_every=4)
        c.optim.update(lr=1e-3, warmup_steps=0, weight_decay=0.0)
        c.checkpoint.every = 2
        return c
    if variant.endswith("sft"):
        c = base_config("sft")
        c.data.update(source="arithmetic", arithmetic_digits=2, seq_len=32, packing=False,
                      eval_batches=2, val_fraction=0.05, arithmetic_op=op)
    else:
        c = base_config("grpo")
        c.data.update(source="arithmetic", arithmetic_digits=2, prompt_len=16, val_fraction=0.05,
                      eval_prompts=128, arithmetic_op=op)
        c.rl.update(rewards="exact_answer" if op == "max" else "exact_answer, digit_match:0.5",
                    num_generations=8, max_new_tokens=8, temperature=1.0, beta=0.0)
        c.optim.update(weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0)
    c.model.update(SMOKE if smoke else MODEL)
    if variant == "smoke-sft":
        c.data.update(arithmetic_examples=512, eval_batches=1)
        c.train.update(steps=20, batch_size=16, log_every=10, eval_every=20)
        c.optim.update(lr=3e-3, warmup_steps=2)
    elif variant == "smoke":
        c.data.update(arithmetic_examples=256, eval_prompts=8)
        c.rl.update(num_generations=4, max_new_tokens=6)
        c.train.update(steps=4, batch_size=4, log_every=1, eval_every=4)
        c.optim.lr = 1e-3
        c.checkpoint.every = 2
    elif variant in ("arith-sft", "max-sft"):
        c.data.arithmetic_examples = 4000
        c.train.update(steps=800 if op == "add" else 300, batch_size=32, log_every=20,
                       eval_every=100)
        c.optim.update(lr=3e-3, warmup_steps=20, weight_decay=0.0)
        c.checkpoint.every = 100
    elif op == "max":
        c.train.update(steps=100, batch_size=16, log_every=5, eval_every=10)
        c.optim.lr = 5e-4
        c.checkpoint.every = 25
    else:
        c.train.update(steps=200, batch_size=16, log_every=5, eval_every=25)
        c.optim.lr = 3e-4
        c.checkpoint.every = 25
    return c
