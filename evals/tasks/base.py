"""What a synthetic skill task is: seeded train / eval / held-out splits and an exact-match grader.

Splits never share a prompt, for any ``n`` and any ``seed``: every example is assigned to exactly one
split by a hash of its problem key (the normalized prompt unless the task names the underlying problem,
so one problem asked in two wordings cannot sit in both train and eval), and each split draws from its
own seed, keeping only examples that hash into it. So a larger train set can never swallow an eval
prompt, and the splits stay fixed as a task grows.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

Split = Literal["train", "eval", "heldout"]
SPLITS: tuple[Split, ...] = get_args(Split)

# Share of the prompt space (out of 100 hash buckets) each split owns.
_BUCKETS: dict[Split, range] = {"train": range(0, 80), "eval": range(80, 90), "heldout": range(90, 100)}


@dataclass(frozen=True)
class Example:
    """One user prompt and the exact answer expected back.

    ``key`` names the underlying problem (e.g. "7 hours->minutes") when several wordings of it exist;
    it decides the split. Empty means the prompt itself.
    """

    prompt: str
    answer: str
    key: str = ""

    @property
    def problem(self) -> str:
        return _prompt_key(self.key or self.prompt)


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The prompt as a one-turn chat; no system message, so the chat template adds its own default."""
    return [{"role": "user", "content": prompt}]


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped, without a trailing period: the answer part."""
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            return line.removesuffix(".").strip()
    return ""


def _prompt_key(prompt: str) -> str:
    # Case and spacing variants of one prompt are the same prompt for the purpose of splitting.
    return " ".join(prompt.split()).casefold()


def split_of(problem: str) -> Split:
    """The one split a problem (an example's ``problem``, or a bare prompt) may appear in."""
    bucket = int.from_bytes(hashlib.sha256(_prompt_key(problem).encode()).digest()[:8], "big") % 100
    return next(split for split, owned in _BUCKETS.items() if bucket in owned)


class Task(ABC):
    """A skill with a seeded generator and an exact-match grader.

    Subclasses set the class attributes and implement ``make``. Bump ``version`` whenever ``make``
    changes what it produces: the training recipe hashes it, so experts are retrained.
    """

    name: ClassVar[str]
    description: ClassVar[str]  # one sentence, read by routers
    skills: ClassVar[tuple[str, ...]]
    domains: ClassVar[tuple[str, ...]]
    version: ClassVar[int] = 1
    case_sensitive: ClassVar[bool] = True
    # Enough tokens for any correct answer; generation can stop there.
    max_new_tokens: ClassVar[int] = 24

    @abstractmethod
    def make(self, rng: random.Random) -> Example:
        """Draw one example; all randomness must come from ``rng``."""

    def normalize(self, text: str) -> str:
        """Light normalization applied to both the output and the answer before comparing."""
        line = " ".join(first_line(text).split())
        return line if self.case_sensitive else line.casefold()

    def grade(self, output: str, answer: str) -> bool:
        """Exact match after ``normalize``."""
        return self.normalize(output) == self.normalize(answer)

    def _seed(self, split: Split, seed: int) -> int:
        # Stable across processes (unlike hash()), distinct per task, version, split and seed.
        text = f"{self.name}:v{self.version}:{split}:{seed}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")

    def examples(self, split: Split, n: int, *, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of ``split``; the same arguments always give the same list, and a
        smaller ``n`` gives a prefix of a larger one."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(self._seed(split, seed))
        seen: set[str] = set()
        out: list[Example] = []
        # Other splits' buckets are rejected, so allow many draws per kept example before giving up.
        budget = 100 * n + 1000
        while len(out) < n:
            budget -= 1
            if budget < 0:
                raise RuntimeError(f"task {self.name!r}: prompt space too small for {n} {split} examples")
            ex = self.make(rng)
            key = _prompt_key(ex.prompt)
            if key in seen or split_of(ex.problem) != split:
                continue
            seen.add(key)
            out.append(ex)
        return out

    @property
    def example_prompts(self) -> list[str]:
        """Three representative prompts from the train split (so they never leak eval items), in
        different wordings where the task has several: routers embed them."""
        candidates = [ex.prompt for ex in self.examples("train", 30)]
        picked: list[str] = []
        openings: set[str] = set()
        for prompt in candidates:
            opening = " ".join(prompt.split()[:2])
            if opening not in openings:
                openings.add(opening)
                picked.append(prompt)
        picked += [p for p in candidates if p not in picked]
        return picked[:3]

    def card(self) -> dict[str, object]:
        """What routers and model cards need to know about the task."""
        return {
            "name": self.name,
            "description": self.description,
            "skills": list(self.skills),
            "domains": list(self.domains),
            "example_prompts": self.example_prompts,
            "version": self.version,
        }

    def __repr__(self) -> str:
        return f"<Task {self.name} v{self.version}>"


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def validate_task(task: Task) -> None:
    """Raise ValueError naming what is wrong with ``task``'s declaration or generator."""
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"task name must match {_NAME_RE.pattern}, got {name!r}")
    desc = getattr(task, "description", None)
    # One sentence: routers embed it as a single statement of what the expert does.
    if not isinstance(desc, str) or not desc.endswith(".") or ". " in desc.strip():
        raise ValueError(f"task {name!r}: description must be one sentence ending with a period")
    for field in ("skills", "domains"):
        value = getattr(task, field, None)
        if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"task {name!r}: {field} must be a non-empty tuple of strings")
    if not isinstance(task.version, int) or task.version < 1:
        raise ValueError(f"task {name!r}: version must be a positive int")
    # Smoke-test the generator: it must yield prompts its own grader accepts the answers of.
    samples = task.examples("train", 3)
    for ex in samples:
        if not ex.prompt.strip() or not task.normalize(ex.answer) or not task.grade(ex.answer, ex.answer):
            raise ValueError(f"task {name!r}: generated example {ex!r} is empty or does not grade as correct")
