"""Two-number arithmetic: addition, subtraction and multiplication, answered with only the number.

Sums and differences of two-digit numbers need no carry or borrow, and products come from the
times table up to 12 × 12: measured on a rank-8 LoRA of SmolLM2-135M after 60 steps, those reach
75-92% while carrying sums, borrowing differences and two-digit products stayed at 6-45%, so the
task tests answering arithmetic directly and exactly, not long arithmetic a 135M model cannot learn
in a few dozen steps.
"""

from __future__ import annotations

import random

from evals.tasks.base import Example, Task

_TEMPLATES = (
    "What is {a} {op} {b}? Answer with only the number.",
    "Compute {a} {op} {b}. Answer with only the number.",
    "Calculate {a} {op} {b} and reply with just the result as a number.",
    "{a} {op} {b} = ? Give only the number.",
)


def _two_digit_pair(rng: random.Random, fits: str) -> tuple[int, int]:
    """Two two-digit numbers whose digits pair up without a carry (``fits="sum"``: each column sums
    to at most 9) or a borrow (``fits="diff"``: each digit of the first is at least the second's)."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if fits == "diff":
            a, b = max(a, b), min(a, b)
        cols = [(a // 10, b // 10), (a % 10, b % 10)]
        if all((x + y <= 9) if fits == "sum" else (x >= y) for x, y in cols):
            return a, b


class ArithmeticTask(Task):
    name = "arithmetic"
    description = "Adds, subtracts or multiplies two whole numbers and answers with only the resulting number."
    skills = ("arithmetic", "addition", "subtraction", "multiplication")
    domains = ("math",)
    max_new_tokens = 8

    def make(self, rng: random.Random) -> Example:
        op = rng.choice("+-×")
        if op == "×":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        elif op == "+":
            a, b = _two_digit_pair(rng, "sum")
            value = a + b
        else:
            a, b = _two_digit_pair(rng, "diff")
            value = a - b
        prompt = rng.choice(_TEMPLATES).format(a=a, op=op, b=b)
        return Example(prompt, str(value), key=f"{a}{op}{b}")
