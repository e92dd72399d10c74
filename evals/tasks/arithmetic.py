"""Two-number arithmetic: addition, subtraction and multiplication, answered with only the number."""

from __future__ import annotations

import random

from evals.tasks.base import Example, Task

_TEMPLATES = (
    "What is {a} {op} {b}? Answer with only the number.",
    "Compute {a} {op} {b}. Answer with only the number.",
    "Calculate {a} {op} {b} and reply with just the result as a number.",
    "{a} {op} {b} = ? Give only the number.",
)


class ArithmeticTask(Task):
    name = "arithmetic"
    description = "Computes the sum, difference or product of two whole numbers and answers with only the number."
    skills = ("arithmetic", "addition", "subtraction", "multiplication")
    domains = ("math",)
    max_new_tokens = 8

    def make(self, rng: random.Random) -> Example:
        op = rng.choice("+-×")
        if op == "×":
            # A two-digit number times a digit: hard for the base to format, learnable in a few dozen steps.
            a, b = rng.randint(10, 99), rng.randint(2, 9)
            if rng.random() < 0.5:
                a, b = b, a
            value = a * b
        elif op == "+":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            value = a + b
        else:
            # Non-negative results keep the answer format to plain digits.
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            a, b = max(a, b), min(a, b)
            value = a - b
        prompt = rng.choice(_TEMPLATES).format(a=a, op=op, b=b)
        return Example(prompt, str(value), key=f"{a}{op}{b}")
