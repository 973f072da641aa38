"""A verifiable task generated in code (no download): multi-digit addition.

    {"prompt": "47+385=", "completion": "432", "answer": "432"}

Problems are drawn from a seed; the held-out split is decided by a hash of the problem's text,
so a held-out problem never appears in training whatever the seed or count. `exact_answer` is
the reward (and the held-out metric): 1 when the completion is the answer, else 0.
`preference_records` pairs each sum (chosen) with a near miss (rejected), for DPO. A share of
the training demonstrations can come from a careless teacher who drops every carry
(`careless`): SFT on them learns the format and the pupil's mistake, which a verifier's reward
can then correct.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

import numpy as np

from infra.section import Section


@dataclasses.dataclass(frozen=True)
class ArithmeticKeys(Section):
    """The `data.arithmetic_*` keys of a task that can generate its data here
    (`data.source = "arithmetic"`): SFT demonstrations, GRPO prompts, DPO pairs."""

    prefix: ClassVar[str] = "data"

    arithmetic_digits: int = 2  # operands of up to this many digits
    arithmetic_examples: int = 20000  # training problems
    arithmetic_careless: float = 0.0  # share of demonstrations that drop every carry (SFT)
    arithmetic_reverse: bool = False  # sums written units digit first

    def validate_arithmetic(self) -> None:
        self.positive("arithmetic_digits", "arithmetic_examples")
        self.in_range("arithmetic_careless", 0, 1)

    def arithmetic_records(self, seed: int, fraction: float) -> tuple[list, list]:
        """(training, held-out) problems in `infra.data.sft`'s record form."""
        return records(self.arithmetic_examples, digits=self.arithmetic_digits, seed=seed,
                       fraction=fraction, careless=self.arithmetic_careless,
                       reverse=self.arithmetic_reverse)

    def arithmetic_pairs(self, seed: int, fraction: float) -> tuple[list, list]:
        """(training, held-out) preference pairs (`preference_records`)."""
        train, held = records(self.arithmetic_examples, digits=self.arithmetic_digits,
                              seed=seed, fraction=fraction, reverse=self.arithmetic_reverse)
        return preference_records(train, held, seed, self.arithmetic_reverse)


def problems(count: int, *, digits: int, seed: int, held_out: bool,
             fraction: float = 0.1, careless: float = 0.0, reverse: bool = False) -> list[dict]:
    """`count` distinct addition problems of up to `digits`-digit operands, from the held-out
    share (`fraction` of all problems, by hash) or the rest. With `careless` > 0 that share of
    the completions (the demonstrations) drop every carry (`no_carry_sum`); `answer` is
    always the sum. `reverse`: sums are written units digit first (47+85=231), the order
    written addition works in, which small models learn far sooner."""
    rng = np.random.default_rng([seed, int(held_out)])
    sloppy = np.random.default_rng([seed, int(held_out), 1])
    high = 10 ** digits
    space = high * high
    wanted = min(count, int(space * (fraction if held_out else 1 - fraction) * 0.9))
    seen: set[str] = set()
    out = []
    while len(out) < wanted:
        a, b = (int(x) for x in rng.integers(0, high, size=2))
        prompt = f"{a}+{b}="
        if prompt in seen or is_held_out(prompt, fraction) != held_out:
            continue
        seen.add(prompt)
        shown = no_carry_sum(a, b) if careless and sloppy.random() < careless else a + b
        write = (lambda n: str(n)[::-1]) if reverse else str
        out.append({"prompt": prompt, "completion": write(shown), "answer": write(a + b)})
    return out


def no_carry_sum(a: int, b: int) -> int:
    """The sum a careless pupil writes: each digit (a_i + b_i) mod 10, no carry (47+85 -> 22)."""
    out, place = 0, 1
    while a or b:
        out += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def records(count: int, *, digits: int, seed: int, fraction: float = 0.1,
            careless: float = 0.0, reverse: bool = False) -> tuple[list, list]:
    """(training, held-out) records in `infra.data.sft`'s (source, number, object) form:
    `count` training problems (`careless`: that share of their completions without carries)
    and a `fraction` as many held out (at least 64; always the true sums)."""
    def tag(split: str, items: list[dict]) -> list:
        return [(f"<arithmetic {split}>", i + 1, r) for i, r in enumerate(items)]

    held = max(64, int(count * fraction))
    return (tag("train", problems(count, digits=digits, seed=seed, held_out=False,
                                  careless=careless, reverse=reverse)),
            tag("held-out", problems(held, digits=digits, seed=seed, held_out=True,
                                     reverse=reverse)))


def preference_records(train: list, held: list, seed: int,
                       reverse: bool = False) -> tuple[list, list]:
    """`records`' problems as preference pairs (DPO): the sum chosen, a near miss (off by 1 to
    10) rejected, both written as the records write them (`reverse`)."""
    rng = np.random.default_rng([seed, 7])
    write = (lambda n: str(n)[::-1]) if reverse else str

    def pair(record: dict) -> dict:
        a, b = map(int, record["prompt"].rstrip("=").split("+"))
        wrong = a + b + int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
        wrong = abs(wrong) if abs(wrong) != a + b else a + b + 1
        return {"prompt": record["prompt"], "chosen": write(a + b), "rejected": write(wrong)}

    return ([(s, n, pair(r)) for s, n, r in train], [(s, n, pair(r)) for s, n, r in held])


def is_held_out(prompt: str, fraction: float) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def exact_answer(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion (surrounding whitespace aside) is the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
