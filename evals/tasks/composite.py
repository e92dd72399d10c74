"""Held-out composite tasks: one message asks two questions that need two different skills.

No expert is trained on these. A single expert can answer at most one part; a composition that routes the
query to both skills' experts and aggregates their answers can answer both. Grading accepts the output
when each part's exact answer appears in it as a whole word (in any order, on any line).
"""

from __future__ import annotations

import random
import re

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
