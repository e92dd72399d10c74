"""JSON field extraction: return the value stored under a named key of a small flat JSON object."""

from __future__ import annotations

import json
import random

from evals.tasks.base import Example, Task

_WORDS: dict[str, tuple[str, ...]] = {
    "name": ("Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Keiko", "Luis"),
    "city": ("Lima", "Oslo", "Nairobi", "Porto", "Quito", "Riga", "Seoul", "Tunis", "Utrecht", "Vienna", "Zagreb"),
    "color": ("amber", "indigo", "teal", "crimson", "olive", "violet", "ochre", "silver", "coral", "navy"),
    "animal": ("otter", "falcon", "lynx", "heron", "badger", "gecko", "walrus", "ibis", "marmot", "tapir"),
    "fruit": ("mango", "quince", "lychee", "papaya", "fig", "guava", "kiwi", "plum", "lime", "date"),
    "status": ("active", "pending", "archived", "suspended", "draft", "closed"),
}
_NUMBERS: dict[str, tuple[int, int]] = {"age": (18, 90), "year": (1950, 2030), "score": (0, 999), "count": (1, 500)}
_KEYS = (*_WORDS, *_NUMBERS, "code")

_TEMPLATES = (
    'Here is a JSON object: {obj}\nWhat is the value of the field "{key}"? Answer with only the value.',
    'From the JSON {obj}, extract the value of "{key}". Reply with only the value, without quotes.',
    'JSON: {obj}\nReturn the value of the key "{key}" and nothing else.',
)


def _code(rng: random.Random) -> str:
    # Random identifiers force copying the value rather than recalling a plausible word.
    return "".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(rng.randint(4, 6)))


class JsonExtractTask(Task):
    name = "json_extract"
    description = "Extracts the value of a named field from a small JSON object and returns only that value."
    skills = ("JSON parsing", "information extraction", "field lookup")
    domains = ("data", "programming")
    max_new_tokens = 10

    def _value(self, key: str, rng: random.Random) -> str | int:
        if key in _WORDS:
            return rng.choice(_WORDS[key])
        if key in _NUMBERS:
            return rng.randint(*_NUMBERS[key])
        return _code(rng)

    def make(self, rng: random.Random) -> Example:
        keys = rng.sample(_KEYS, rng.randint(3, 5))
        obj = {k: self._value(k, rng) for k in keys}
        key = rng.choice(keys)
        text = json.dumps(obj)
        prompt = rng.choice(_TEMPLATES).format(obj=text, key=key)
        return Example(prompt, str(obj[key]), key=f"{text}[{key}]")
