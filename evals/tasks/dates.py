"""Date normalization: a date written out in words becomes ISO 8601 (YYYY-MM-DD)."""

from __future__ import annotations

import datetime as dt
import random

from evals.tasks.base import Example, Task

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_FIRST = dt.date(1900, 1, 1).toordinal()
_LAST = dt.date(2099, 12, 31).toordinal()

_TEMPLATES = (
    "Convert the date {d} to ISO format (YYYY-MM-DD). Answer with only the date.",
    'Rewrite "{d}" as YYYY-MM-DD. Answer with only the date.',
    "What is {d} in ISO 8601 date format? Answer with only the date as YYYY-MM-DD.",
)


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _written(d: dt.date, style: int) -> str:
    month = _MONTHS[d.month - 1]
    styles = (
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{month[:3]} {d.day}, {d.year}",
        f"the {_ordinal(d.day)} of {month}, {d.year}",
        f"{d.strftime('%A')}, {month} {d.day}, {d.year}",
        f"{month} {_ordinal(d.day)} {d.year}",
    )
    return styles[style % len(styles)]


class DatesTask(Task):
    name = "dates"
    description = "Normalizes a date written in words, such as March 5, 2021, to the ISO format YYYY-MM-DD."
    skills = ("date normalization", "date formatting", "ISO 8601")
    domains = ("dates", "data cleaning")
    max_new_tokens = 12

    def make(self, rng: random.Random) -> Example:
        d = dt.date.fromordinal(rng.randint(_FIRST, _LAST))
        prompt = rng.choice(_TEMPLATES).format(d=_written(d, rng.randrange(6)))
        return Example(prompt, d.isoformat(), key=d.isoformat())
