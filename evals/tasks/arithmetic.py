"""Two-number arithmetic: addition, subtraction and multiplication, answered with only the number.

The numbers are chosen so each answer needs only single-digit facts the model can learn to state
directly: two-digit sums without a carry, a two-digit number minus a digit without a borrow, and
products up to 10 × 10. Measured on a rank-8 LoRA of SmolLM2-135M: carry-free sums reached 100% in
60 steps, while carrying sums, two-digit differences (51%, 77% after 120 steps), products with 11 or
12 and two-digit products (27%) stayed out of reach of a few dozen steps.
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


def _carry_free_sum(rng: random.Random) -> tuple[int, int]:
    """Two two-digit numbers whose tens and units digits each sum to at most 9."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a // 10 + b // 10 <= 9 and a % 10 + b % 10 <= 9:
            return a, b


def _borrow_free_difference(rng: random.Random) -> tuple[int, int]:
    """A two-digit number and a digit no larger than its units digit."""
    while True:
        a = rng.randint(11, 99)
        if a % 10:
            return a, rng.randint(1, a % 10)


class ArithmeticTask(Task):
    name = "arithmetic"
    description = "Adds, subtracts or multiplies two whole numbers and answers with only the resulting number."
    skills = ("arithmetic", "addition", "subtraction", "multiplication")
    domains = ("math",)
    max_new_tokens = 8

    def make(self, rng: random.Random) -> Example:
        op = rng.choice("+-×")
        if op == "×":
            a, b = rng.randint(2, 10), rng.randint(2, 10)
            value = a * b
        elif op == "+":
            a, b = _carry_free_sum(rng)
            value = a + b
        else:
            a, b = _borrow_free_difference(rng)
            value = a - b
        prompt = rng.choice(_TEMPLATES).format(a=a, op=op, b=b)
        return Example(prompt, str(value), key=f"{a}{op}{b}")
