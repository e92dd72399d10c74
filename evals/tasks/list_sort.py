"""List sorting: put a short list of two-digit numbers in ascending order, comma-separated."""

from __future__ import annotations

import random
import re

from evals.tasks.base import Example, Task

_TEMPLATES = (
    "Sort these numbers from smallest to largest: {items}. Answer with only the sorted list, separated by commas.",
    "Arrange in ascending order: {items}. Reply with only the numbers, comma-separated.",
    "Put the following numbers in increasing order: {items}. Give only the sorted numbers separated by commas.",
)


class ListSortTask(Task):
    name = "list_sort"
    description = "Sorts a short list of numbers in ascending order and returns them comma-separated."
    skills = ("sorting", "ordering", "list manipulation")
    domains = ("math", "data")
    max_new_tokens = 24

    def make(self, rng: random.Random) -> Example:
        # Two-digit values only: a trained 135M model sorts digit strings well but put one-digit numbers
        # where a string sort would (measured: 77% with 1..99, errors like "10, 44, 64, 9").
        values = rng.sample(range(10, 100), rng.randint(4, 6))
        items = ", ".join(map(str, values))
        prompt = rng.choice(_TEMPLATES).format(items=items)
        return Example(prompt, ", ".join(map(str, sorted(values))), key=items)

    def normalize(self, text: str) -> str:
        # "3,7, 12" and "3, 7, 12" are the same list.
        return re.sub(r"\s*,\s*", ", ", super().normalize(text))
