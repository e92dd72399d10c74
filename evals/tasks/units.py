"""Unit conversion with exact whole-number answers: a larger unit to a smaller one by a power of ten."""

from __future__ import annotations

import random

from evals.tasks.base import Example, Task

# (from unit, to unit, factor, largest quantity). Only power-of-ten factors: the skill is knowing the
# factor and writing the exact result. Factors like 60 or 24 need multiplication facts a LoRA on a 135M
# model does not pick up in a few dozen steps (measured: "7 minutes to seconds" -> "15"; 58% overall).
# One factor per source unit: with both meters->centimeters and meters->millimeters the trained model
# mixed up 100 and 1000 (3/9 right).
_CONVERSIONS = (
    ("kilometers", "meters", 1000, 999),
    ("meters", "centimeters", 100, 999),
    ("centimeters", "millimeters", 10, 999),
    ("kilograms", "grams", 1000, 999),
    ("grams", "milligrams", 1000, 999),
    ("tonnes", "kilograms", 1000, 999),
    ("liters", "milliliters", 1000, 999),
    ("kilowatts", "watts", 1000, 999),
    ("kilojoules", "joules", 1000, 999),
    ("dollars", "cents", 100, 999),
    ("millennia", "years", 1000, 99),
    ("centuries", "years", 100, 99),
    ("decades", "years", 10, 99),
)

# No trailing zeros in the quantity: "780 km" -> "780000" had the model miscount zero runs.
_QUANTITIES = {top: [n for n in range(2, top + 1) if n % 10] for *_, top in _CONVERSIONS}

_TEMPLATES = (
    "Convert {q} {src} to {dst}. Answer with only the number.",
    "How many {dst} are in {q} {src}? Answer with only the number.",
    "{q} {src} is how many {dst}? Reply with just the number.",
    "Express {q} {src} in {dst}. Give only the number, without the unit.",
)


class UnitsTask(Task):
    name = "units"
    description = "Converts a quantity to a smaller unit, such as kilometers to meters, as an exact whole number."
    skills = ("unit conversion", "measurement", "metric prefixes")
    domains = ("math", "science", "everyday")
    max_new_tokens = 10

    def make(self, rng: random.Random) -> Example:
        src, dst, factor, top = rng.choice(_CONVERSIONS)
        q = rng.choice(_QUANTITIES[top])
        prompt = rng.choice(_TEMPLATES).format(q=q, src=src, dst=dst)
        return Example(prompt, str(q * factor), key=f"{q} {src}->{dst}")
