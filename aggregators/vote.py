"""``vote``: take the final answer out of each expert's text and keep the (router-weighted) majority.

No model runs: ``extract_answer`` pulls a comparable answer (a boxed answer, an "Answer: X" line, a
number, a label) out of each successful answer, ``weighted_majority`` tallies them, and the user gets
the whole text of the strongest expert that voted for the winner.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

from aggregators.base import AGGREGATORS, Aggregation, Aggregator, AggregatorConfig, ExpertAnswer, require
from serving.engine import GenerationFailed

ExtractMode = Literal["auto", "number", "label", "line", "json"]
EXTRACT_MODES: tuple[str, ...] = ("auto", "number", "label", "line", "json")

# "Answer: X", "The final answer is X", "answer = X", "Result: X"; X runs to the end of its sentence or line.
_ANSWER_RE = re.compile(
    r"\b(?:final\s+)?(?:answer|result)\s*(?:is\b\s*:?|:|=)\s*(?P<value>[^\n]+?)\s*(?=\.(?:\s|$)|\n|$)",
    re.IGNORECASE,
)
# A number: optional sign (not a hyphen glued to a word, as in a date), thousands groups or plain digits,
# optional decimals.
_NUMBER_RE = re.compile(r"(?:(?<![\w-])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w-])-)?\.\d+")
_WHOLE_NUMBER_RE = re.compile(rf"^(?:{_NUMBER_RE.pattern})$")
_BOXED = "\\boxed{"
_WRAPPERS = " \t*_`'\"$"  # markdown / LaTeX / quote characters around an answer


def normalize_number(text: str) -> str | None:
    """``"1,000"`` -> ``"1000"``, ``"4.0"`` -> ``"4"``, ``"-0.50"`` -> ``"-0.5"``; None if not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _last_boxed(text: str) -> str | None:
    """The contents of the last balanced ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth = 0
        for i in range(start + len(_BOXED) - 1, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    inner = text[start + len(_BOXED) : i].strip()
                    if inner:
                        return inner
                    break
        start = text.rfind(_BOXED, 0, start)
    return None


def _clean(value: str) -> str:
    """Strip whitespace, surrounding markup and one trailing period."""
    value = value.strip().strip(_WRAPPERS)
    if value.endswith("."):
        value = value[:-1]
    return value.strip().strip(_WRAPPERS)


def _first_line(text: str) -> str | None:
    for line in text.splitlines():
        cleaned = _clean(line)
        if cleaned:
            return cleaned
    return None


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """The final answer in a model's ``text``, or None when there is none to find.

    - ``auto``: a ``\\boxed{...}`` answer; else the last "Answer: X" / "answer is X" (or "Result: X");
      else the first non-empty line (stripped, trailing period removed).
    - ``number``: the last number in the text, normalized (``"4.0"`` -> ``"4"``, ``"1,000"`` -> ``"1000"``).
    - ``label``: the first word, lowercased, without punctuation around it.
    - ``line``: the first non-empty line, stripped, trailing period removed.
    - ``json``: the whole text as a JSON value, written canonically (keys sorted, no spaces): answers asked for
      as JSON (``response_format``) are compared as parsed objects, whatever their layout.
    """
    if mode == "auto":
        boxed = _last_boxed(text)
        if boxed is not None:
            return _clean(boxed) or boxed
        matches = [_clean(m.group("value")) for m in _ANSWER_RE.finditer(text)]
        matches = [m for m in matches if m]
        if matches:
            return matches[-1]
        return _first_line(text)
    if mode == "number":
        numbers = _NUMBER_RE.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    if mode == "label":
        for word in text.split():
            label = re.sub(r"^[\W_]+|[\W_]+$", "", word).lower()
            if label:
                return label
        return None
    if mode == "line":
        return _first_line(text)
    if mode == "json":
        return canonical_json(text)
    raise ValueError(f"unknown extract mode {mode!r}; known: {', '.join(EXTRACT_MODES)}")


def canonical_json(text: str) -> str | None:
    """``text`` parsed as JSON and written again with sorted keys and no spaces; None if it does not parse."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def calls_key(tool_calls: Sequence[dict[str, Any]]) -> str | None:
    """Tool calls compared as parsed objects: each call's function name and its arguments parsed (their ids and
    layout ignored); None when an argument string does not parse."""
    calls = []
    for call in tool_calls:
        function = call.get("function") or {}
        arguments = canonical_json(function.get("arguments") or "{}")
        if arguments is None:
            return None
        calls.append({"name": function.get("name"), "arguments": json.loads(arguments)})
    return json.dumps(calls, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def vote_key(answer: str) -> str:
    """What answers are compared by: case and spacing ignored, and an answer that is a number compares
    as that number (``"4.0"`` and ``"4"`` agree)."""
    collapsed = " ".join(answer.split())
    if _WHOLE_NUMBER_RE.match(collapsed):
        number = normalize_number(collapsed)
        if number is not None:
            return number
    return collapsed.casefold()


@dataclass(frozen=True)
class Tally:
    """The result of a vote: the winning key, the positions that voted for it, and every key's score."""

    winner: str
    voters: list[int]  # indices into the votes, in order
    scores: dict[str, float]


def weighted_majority(votes: Sequence[tuple[str, float]], *, weighted: bool = True) -> Tally:
    """The majority among ``(key, weight)`` votes given in expert order.

    Each vote counts its weight (``weighted``) or 1. A tie goes to the key with the larger single weight
    among its voters, then to the key voted for first.
    """
    if not votes:
        raise ValueError("weighted_majority needs at least one vote")
    scores: dict[str, float] = {}
    top_weight: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, (key, weight) in enumerate(votes):
        scores[key] = scores.get(key, 0.0) + (weight if weighted else 1.0)
        top_weight[key] = max(top_weight.get(key, -math.inf), weight)
        first.setdefault(key, index)
    best = max(scores.values())
    tied = [key for key in scores if math.isclose(scores[key], best, rel_tol=1e-9, abs_tol=1e-12)]
    winner = min(tied, key=lambda key: (-top_weight[key], first[key]))
    voters = [index for index, (key, _) in enumerate(votes) if key == winner]
    return Tally(winner=winner, voters=voters, scores=scores)


def successful(answers: Sequence[ExpertAnswer]) -> list[ExpertAnswer]:
    """The answers without an error; GenerationFailed when there are none."""
    ok = [answer for answer in answers if answer.ok]
    if not ok:
        failures = "; ".join(f"{a.slug}: {a.error}" for a in answers) or "no expert answered"
        raise GenerationFailed(f"every chosen expert failed: {failures}")
    return ok


def strongest(answers: Sequence[ExpertAnswer]) -> ExpertAnswer:
    """The answer with the largest router weight (the earliest one on a tie)."""
    return max(answers, key=lambda answer: answer.weight)  # max keeps the first of equal weights


class VoteConfig(AggregatorConfig, frozen=True):
    """Parameters of ``vote``.

    extract: how each expert's final answer is found: "auto" (boxed, then "Answer: X", then the first line),
        "number" (the last number), "label" (the first word), "line" (the first non-empty line) or "json" (the
        whole answer as a JSON value; a request that asks for JSON or tool calls always votes so).
    weighted: true: each answer counts its router weight; false: one vote per expert.
    """

    extract: ExtractMode = "auto"
    weighted: bool = True

    def check(self) -> None:
        require(self.extract in EXTRACT_MODES, "extract", f"must be one of {', '.join(EXTRACT_MODES)}")


@AGGREGATORS.register
class Vote(Aggregator):
    name = "vote"
    config_cls = VoteConfig
    help = "Extract each expert's final answer and keep the (router-weighted) majority."
    uses_model = False
    compares_structured = True

    config: VoteConfig

    def max_tokens(self, requested: int) -> int:
        return 0  # no aggregator model runs

    def for_structured(self) -> Vote:
        return Vote(msgspec.structs.replace(self.config, extract="json"))

    def _extract(self, answer: ExpertAnswer) -> str | None:
        if self.config.extract == "json" and answer.tool_calls:
            return calls_key(answer.tool_calls)
        return extract_answer(answer.text, self.config.extract)

    def combine(self, query: str, answers: list[ExpertAnswer]) -> Aggregation:
        ok = successful(answers)
        failed = [answer.slug for answer in answers if not answer.ok]
        extracted = {answer.slug: self._extract(answer) for answer in ok}
        voting = [answer for answer in ok if extracted[answer.slug] is not None]
        extra: dict[str, object] = {"failed": failed, "extracted": extracted}
        if not voting:
            fallback = strongest(ok)
            extra["votes"] = {}
            return Aggregation(
                text=fallback.text,
                chosen=[fallback.slug],
                reason=f"no answer could be extracted ({self.config.extract}); kept the highest-weight expert",
                extra=extra,
                tool_calls=fallback.tool_calls,
            )
        # JSON is compared exactly as written canonically; other answers with case and spacing ignored
        key = (lambda value: value) if self.config.extract == "json" else vote_key
        votes = [(key(extracted[answer.slug] or ""), answer.weight) for answer in voting]
        tally = weighted_majority(votes, weighted=self.config.weighted)
        winners = [voting[index] for index in tally.voters]
        best = strongest(winners)
        total = sum(tally.scores.values())
        unit = "weight" if self.config.weighted else "votes"
        extra.update(answer=extracted[best.slug], votes=tally.scores)
        return Aggregation(
            text=best.text,
            chosen=[answer.slug for answer in winners],
            reason=(
                f"{len(winners)} of {len(voting)} experts agreed on {extracted[best.slug]!r} "
                f"({unit} {tally.scores[tally.winner]:.3g} of {total:.3g})"
            ),
            extra=extra,
            tool_calls=best.tool_calls,
        )
