"""Held-out composite tasks: queries that need two different skills. No expert is trained on these.

Two kinds:
- two questions in one message (``TwoSkillTask``): a single expert can answer at most one part; a
  composition that routes the query to both skills' experts and aggregates their answers can answer both.
  Grading accepts the output when each part's exact answer appears in it as a whole word.
- one question whose single answer needs both skills in turn (``json_dates``, ``json_units``): find a
  field in a JSON object, then rewrite its value (a date to ISO 8601, a quantity to a smaller unit). The
  extraction expert copies the value unchanged; the rewriting expert has never seen JSON and must pick the
  right one of several values. Token-level mixtures are built for this kind: every generated token can draw
  on both experts. Graded by exact match of the first line.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re

from evals.tasks import dates, units
from evals.tasks.arithmetic import ArithmeticTask
from evals.tasks.base import Example, Task
from evals.tasks.sentiment import SentimentTask


class TwoSkillTask(Task):
    """Base for composites: a question of ``first`` and one of ``second`` in one message."""

    first: Task
    second: Task

    def make(self, rng: random.Random) -> Example:
        a, b = self.first.make(rng), self.second.make(rng)
        prompt = f"Answer both questions, one answer per line.\n1. {a.prompt}\n2. {b.prompt}"
        return Example(prompt, f"{a.answer}\n{b.answer}", key=f"{a.problem} || {b.problem}")

    def normalize(self, text: str) -> str:
        return " ".join(text.split()).casefold()

    def grade(self, output: str, answer: str) -> bool:
        """Every part of the answer appears in the output as a whole word (not inside a longer number)."""
        text = self.normalize(output)
        parts = [self.normalize(p) for p in answer.split("\n") if p.strip()]
        return bool(parts) and all(re.search(rf"(?<![\w.]){re.escape(p)}(?![\w]|\.\d)", text) for p in parts)


class ArithmeticSentimentTask(TwoSkillTask):
    name = "arithmetic_sentiment"
    description = "Answers a two-number arithmetic question and labels the sentiment of a review, in one message."
    skills = ("arithmetic", "sentiment analysis")
    domains = ("math", "reviews")
    first = ArithmeticTask()
    second = SentimentTask()
    max_new_tokens = ArithmeticTask.max_new_tokens + SentimentTask.max_new_tokens + 8


def _json_question(rng: random.Random, fields: dict[str, str | int], question: str) -> str:
    """A JSON object of ``fields`` (in a random order), then ``question`` on the next line."""
    items = list(fields.items())
    rng.shuffle(items)
    return f"JSON: {json.dumps(dict(items))}\n{question}"


class JsonDatesTask(Task):
    name = "json_dates"
    description = "Reads the date stored under a named key of a JSON object and writes it as YYYY-MM-DD."
    skills = ("JSON parsing", "date normalization")
    domains = ("data", "dates")
    max_new_tokens = 12
    _KEYS = ("born", "joined", "shipped", "due")
    _ASKS = (
        'Return the value of the key "{key}" as a date in YYYY-MM-DD format. Answer with only the date.',
        'What is the date in the field "{key}"? Answer with only the date as YYYY-MM-DD.',
    )

    def make(self, rng: random.Random) -> Example:
        keys = rng.sample(self._KEYS, 2)
        days = [dt.date.fromordinal(rng.randint(dates._FIRST, dates._LAST)) for _ in keys]
        fields: dict[str, str | int] = {k: dates._written(d, rng.randrange(6)) for k, d in zip(keys, days, strict=True)}
        fields["name"] = rng.choice(("Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid"))
        asked = rng.randrange(2)
        prompt = _json_question(rng, fields, rng.choice(self._ASKS).format(key=keys[asked]))
        return Example(prompt, days[asked].isoformat())


class JsonUnitsTask(Task):
    name = "json_units"
    description = "Reads the quantity stored under a named key of a JSON object and converts it to a smaller unit."
    skills = ("JSON parsing", "unit conversion")
    domains = ("data", "math")
    max_new_tokens = 10
    # The asked key names what its unit measures; the other two keys are other measures.
    _KEY_OF = {"kilometers": "distance", "meters": "length", "centimeters": "width", "kilograms": "weight",
               "grams": "mass", "tonnes": "cargo", "liters": "volume", "kilowatts": "power",
               "kilojoules": "energy", "dollars": "price", "millennia": "age", "centuries": "span",
               "decades": "period"}  # fmt: skip
    _ASKS = (
        'The field "{key}" is in {src}. Convert it to {dst}. Answer with only the number.',
        'How many {dst} is the value of "{key}", given in {src}? Answer with only the number.',
    )

    def make(self, rng: random.Random) -> Example:
        src, dst, factor, top = rng.choice(units._CONVERSIONS)
        key = self._KEY_OF[src]
        keys = [key, *rng.sample([k for k in self._KEY_OF.values() if k != key], 2)]
        values = rng.sample(units._QUANTITIES[top], 3)
        fields: dict[str, str | int] = dict(zip(keys, values, strict=True))
        prompt = _json_question(rng, fields, rng.choice(self._ASKS).format(key=key, src=src, dst=dst))
        return Example(prompt, str(values[0] * factor))
