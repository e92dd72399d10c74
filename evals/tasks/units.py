"""Unit conversion with exact whole-number answers (a larger unit to a smaller one)."""

from __future__ import annotations

import random

from evals.tasks.base import Example, Task

# (from unit, to unit, factor, largest quantity). Power-of-ten factors take any quantity up to 999;
# the others stay small so the product is a multiplication fact rather than long multiplication.
_CONVERSIONS = (
    ("kilometers", "meters", 1000, 999),
    ("meters", "centimeters", 100, 999),
    ("centimeters", "millimeters", 10, 999),
    ("meters", "millimeters", 1000, 999),
    ("kilograms", "grams", 1000, 999),
    ("grams", "milligrams", 1000, 999),
    ("tonnes", "kilograms", 1000, 999),
    ("liters", "milliliters", 1000, 999),
    ("dollars", "cents", 100, 999),
    ("centuries", "years", 100, 99),
    ("decades", "years", 10, 99),
    ("hours", "minutes", 60, 12),
    ("minutes", "seconds", 60, 12),
    ("days", "hours", 24, 10),
    ("weeks", "days", 7, 12),
    ("feet", "inches", 12, 12),
    ("yards", "feet", 3, 30),
)

_TEMPLATES = (
    "Convert {q} {src} to {dst}. Answer with only the number.",
    "How many {dst} are in {q} {src}? Answer with only the number.",
    "{q} {src} is how many {dst}? Reply with just the number.",
    "Express {q} {src} in {dst}. Give only the number, without the unit.",
)


class UnitsTask(Task):
    name = "units"
    description = "Converts a quantity to a smaller unit, such as kilometers to meters, as an exact whole number."
    skills = ("unit conversion", "measurement", "multiplication")
    domains = ("math", "science", "everyday")
    max_new_tokens = 8

    def make(self, rng: random.Random) -> Example:
        src, dst, factor, top = rng.choice(_CONVERSIONS)
        q = rng.randint(2, top)
        prompt = rng.choice(_TEMPLATES).format(q=q, src=src, dst=dst)
        return Example(prompt, str(q * factor), key=f"{q} {src}->{dst}")
