"""Verifiable tasks generated in code (no download): multi-digit addition, or the larger of
two numbers (`op`).

    {"prompt": "47+385=", "completion": "432", "answer": "432"}            op "add"
    {"prompt": "max(47,85)=", "completion": "47", "answer": "85"}          op "max"

For "add" the completions (what SFT imitates) are the sums. For "max" they demonstrate the
answer's format only: either number, drawn at random, as a teacher who knows the form of the
answer but not which one is asked for; the reward then teaches which.

Problems are drawn from a seed; the held-out split is decided by a hash of the problem's text,
so a held-out problem never appears in training whatever the seed or count. `exact_answer` is
the reward (and the held-out metric): 1 when the completion is the answer, else 0.
`preference_records` pairs each sum (chosen) with a near miss (rejected), for DPO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import ClassVar

import numpy as np

from infra.section import Section

OPS = ("add", "max")


@dataclasses.dataclass(frozen=True)
class ArithmeticKeys(Section):
    """The `data.arithmetic_*` keys of a task that can generate its data here
    (`data.source = "arithmetic"`): SFT demonstrations, GRPO prompts, DPO pairs."""

    prefix: ClassVar[str] = "data"

    arithmetic_digits: int = 2  # operands of up to this many digits
    arithmetic_examples: int = 20000  # training problems
    arithmetic_op: str = "add"  # add (a+b=) | max (max(a,b)=; SFT shows the format only)

    def validate_arithmetic(self) -> None:
        self.positive("arithmetic_digits", "arithmetic_examples")
        self.one_of("arithmetic_op", OPS)

    def arithmetic_records(self, seed: int, fraction: float) -> tuple[list, list]:
        """(training, held-out) problems in `infra.data.sft`'s record form."""
        return records(self.arithmetic_examples, digits=self.arithmetic_digits, seed=seed,
                       fraction=fraction, op=self.arithmetic_op)

    def arithmetic_pairs(self, seed: int, fraction: float) -> tuple[list, list]:
        """(training, held-out) preference pairs (`preference_records`)."""
        return preference_records(*self.arithmetic_records(seed, fraction), seed)


def problems(count: int, *, digits: int, seed: int, held_out: bool,
             fraction: float = 0.1, op: str = "add") -> list[dict]:
    """`count` distinct problems of `op` on up to `digits`-digit operands, from the held-out
    share (`fraction` of all problems, by hash) or the rest."""
    rng = np.random.default_rng([seed, int(held_out)])
    teacher = np.random.default_rng([seed, int(held_out), 1])
    high = 10 ** digits
    space = high * high
    wanted = min(count, int(space * (fraction if held_out else 1 - fraction) * 0.9))
    seen: set[str] = set()
    out = []
    while len(out) < wanted:
        a, b = (int(x) for x in rng.integers(0, high, size=2))
        prompt = f"{a}+{b}=" if op == "add" else f"max({a},{b})="
        if prompt in seen or is_held_out(prompt, fraction) != held_out:
            continue
        seen.add(prompt)
        answer = answer_of(prompt)
        shown = answer if op == "add" else str((a, b)[int(teacher.integers(2))])
        out.append({"prompt": prompt, "completion": shown, "answer": answer})
    return out


def answer_of(prompt: str) -> str:
    """The right answer to a generated problem."""
    a, b = (int(x) for x in re.findall(r"\d+", prompt))
    return str(max(a, b) if prompt.startswith("max") else a + b)


def records(count: int, *, digits: int, seed: int, fraction: float = 0.1,
            op: str = "add") -> tuple[list, list]:
    """(training, held-out) records in `infra.data.sft`'s (source, number, object) form:
    `count` training problems and a `fraction` as many held out (at least 64)."""
    def tag(split: str, items: list[dict]) -> list:
        return [(f"<arithmetic {split}>", i + 1, r) for i, r in enumerate(items)]

    held = max(64, int(count * fraction))
    return (tag("train", problems(count, digits=digits, seed=seed, held_out=False, op=op)),
            tag("held-out", problems(held, digits=digits, seed=seed, held_out=True, op=op)))


def preference_records(train: list, held: list, seed: int) -> tuple[list, list]:
    """`records`' problems as preference pairs (DPO): the answer chosen, a near miss (off by 1
    to 10) rejected."""
    rng = np.random.default_rng([seed, 7])

    def pair(record: dict) -> dict:
        right = int(answer_of(record["prompt"]))
        wrong = right + int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
        wrong = abs(wrong) if abs(wrong) != right else right + 1
        return {"prompt": record["prompt"], "chosen": str(right), "rejected": str(wrong)}

    return ([(s, n, pair(r)) for s, n, r in train], [(s, n, pair(r)) for s, n, r in held])


def is_held_out(prompt: str, fraction: float) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def exact_answer(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion (surrounding whitespace aside) is the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
