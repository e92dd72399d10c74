"""`kshot` router (Leveraging Open Knowledge): choose the experts that solve K labelled examples of the task.

``fit_expert`` runs the expert greedily on the K example prompts and grades exact match (first line of the
output against the answer, stripped, case-insensitive). An expert that solves fewer than ``min_solved`` of
them is a blind guesser and is never chosen (score 0). The choice is per task, so the query itself does not
change it: the k experts are picked greedily, each step taking the expert that maximizes

    accuracy(e) + diversity · |solved(e) \\ solved(chosen)| / K

i.e. its k-shot accuracy plus a bonus for the examples it solves that the experts chosen so far do not.
Every candidate's score is its accuracy; the chosen experts are weighted in proportion to it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import msgspec

from routers.query.base import (
    ROUTERS,
    Candidate,
    GlobalRouter,
    RouteDecision,
    RouterConfig,
    require,
)

MAX_EXAMPLES = 64


class KShotExample(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One labelled example: the prompt an expert is asked and the exact answer expected."""

    prompt: str
    answer: str


class KShotConfig(RouterConfig, frozen=True):
    """Parameters of ``kshot``.

    examples: the K labelled examples of the task (1..64), each ``{"prompt", "answer"}``.
    diversity: weight of the bonus for solving examples the chosen experts miss (0..1).
    max_new_tokens: tokens each expert may generate per example (1..1024).
    min_solved: the fewest examples an expert must solve not to count as a blind guesser (1..K).
    """

    examples: tuple[KShotExample, ...] = ()
    diversity: float = 0.3
    max_new_tokens: int = 48
    min_solved: int = 1

    def check(self) -> None:
        require(len(self.examples) > 0, "examples", "give at least one labelled example")
        require(len(self.examples) <= MAX_EXAMPLES, "examples", f"at most {MAX_EXAMPLES} examples")
        for i, example in enumerate(self.examples):
            require(bool(example.prompt.strip()), f"examples[{i}].prompt", "must not be empty")
            require(bool(normalize_answer(example.answer)), f"examples[{i}].answer", "must not be empty")
        require(math.isfinite(self.diversity) and 0.0 <= self.diversity <= 1.0, "diversity", "must lie between 0 and 1")
        require(1 <= self.max_new_tokens <= 1024, "max_new_tokens", "must lie between 1 and 1024")
        require(
            1 <= self.min_solved <= len(self.examples), "min_solved", "must lie between 1 and the number of examples"
        )


def normalize_answer(text: str) -> str:
    """The first non-empty line, stripped and case-folded: what exact match compares."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip().casefold()
    return ""


def greedy_pick(
    solved: dict[str, list[bool]], k: int, diversity: float, order: Sequence[str]
) -> list[tuple[str, float]]:
    """Up to k experts, each maximizing accuracy + diversity × (share of examples only it adds).

    ``solved`` holds only eligible experts; ties go to the higher accuracy, then to ``order``.
    Returns (slug, marginal gain) in the order they were chosen.
    """
    rank = {slug: i for i, slug in enumerate(order)}
    remaining = sorted(solved, key=lambda s: rank.get(s, len(rank)))
    covered: set[int] = set()
    chosen: list[tuple[str, float]] = []
    while remaining and len(chosen) < k:

        def gain(slug: str) -> tuple[float, float]:
            vector = solved[slug]
            total = max(len(vector), 1)
            accuracy = sum(vector) / total
            new = sum(1 for i, ok in enumerate(vector) if ok and i not in covered) / total
            return accuracy + diversity * new, accuracy

        best = max(remaining, key=gain)  # max keeps the first of equals: candidate order breaks ties
        chosen.append((best, gain(best)[0]))
        covered.update(i for i, ok in enumerate(solved[best]) if ok)
        remaining.remove(best)
    return chosen


@ROUTERS.register
class KShotRouter(GlobalRouter):
    name = "kshot"
    fit_uses_model = True  # fitting runs every expert on the K examples
    config_cls = KShotConfig
    help = "Leveraging Open Knowledge: pick the experts that solve K labelled examples, preferring a diverse set"

    config: KShotConfig

    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        generate = self.context.need_generate(self.name)
        outputs = await asyncio.gather(
            *(
                generate(candidate.slug, [{"role": "user", "content": ex.prompt}], self.config.max_new_tokens)
                for ex in self.config.examples
            )
        )
        correct = [
            normalize_answer(out) == normalize_answer(ex.answer)
            for out, ex in zip(outputs, self.config.examples, strict=True)
        ]
        return {"correct": correct, "accuracy": sum(correct) / len(correct), "solved": sum(correct)}

    def prepare(self, candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {c.slug: state for c, state in zip(candidates, states, strict=True)}

    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        unfitted = {"correct": [], "accuracy": 0.0, "solved": 0}
        states = {c.slug: prepared.get(c.slug, unfitted) for c in candidates}
        n = len(self.config.examples)
        eligible = {
            slug: [bool(x) for x in state["correct"]]
            for slug, state in states.items()
            if int(state["solved"]) >= self.config.min_solved
        }
        scores = {slug: round(float(states[slug]["accuracy"]) if slug in eligible else 0.0, 6) for slug in states}
        guessers = [slug for slug in states if slug not in eligible]
        accuracies = ", ".join(f"{slug} {float(states[slug]['accuracy']):.2f}" for slug in states)
        extra: dict[str, Any] = {"blind_guessers": guessers}
        if not eligible:
            reason = f"no expert solves at least {self.config.min_solved} of the {n} examples ({accuracies})"
            return RouteDecision(self.name, [], scores, reason, True, extra)
        chosen = greedy_pick(eligible, max(k, 0), self.config.diversity, [c.slug for c in candidates])
        covered = {i for slug, _ in chosen for i, ok in enumerate(eligible[slug]) if ok}
        extra["coverage"] = round(len(covered) / n, 6)
        total = sum(scores[slug] for slug, _ in chosen)
        experts = [(slug, round(scores[slug] / total, 6)) for slug, _ in chosen]
        reason = f"k-shot accuracy on {n} examples: {accuracies}; chose {', '.join(s for s, _ in chosen)}"
        if guessers:
            reason += f" (blind guessers left out: {', '.join(guessers)})"
        return RouteDecision(self.name, experts, scores, reason, False, extra)
