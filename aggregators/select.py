"""``select`` (universal self-consistency, a judge): an aggregator model names the best of the experts'
answers by its number, and that expert's whole answer is returned.

An output that names no valid candidate never fails the request: the highest-weight answer is kept.
"""

from __future__ import annotations

import re

from aggregators.base import AGGREGATORS, Aggregation, Aggregator, AggregatorConfig, ExpertAnswer, require
from aggregators.synthesize import MAX_TOKENS_LIMIT, check_model, format_candidates
from aggregators.vote import strongest, successful

SELECT_SYSTEM = (
    "You are a careful judge. You are given a question and several numbered candidate answers to it, "
    "written by different experts; some of them may be wrong. Decide which candidate answers the question "
    "best (correct first, then complete and clear). Reply with only the number of that candidate, "
    "for example: 2"
)
_INTEGER_RE = re.compile(r"-?\d+")


class SelectConfig(AggregatorConfig, frozen=True):
    """Parameters of ``select``.

    model: slug of the expert that judges (None: the composition's fallback model).
    max_tokens: new tokens the judge may write (it only writes a number).
    """

    model: str | None = None
    max_tokens: int = 8

    def check(self) -> None:
        check_model(self.model)
        require(1 <= self.max_tokens <= MAX_TOKENS_LIMIT, "max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}")


@AGGREGATORS.register
class Select(Aggregator):
    name = "select"
    config_cls = SelectConfig
    help = "An aggregator model picks the best expert answer by its number; that answer is returned whole."
    uses_model = True

    config: SelectConfig

    def max_tokens(self, requested: int) -> int:
        return self.config.max_tokens

    def prompt(self, query: str, answers: list[ExpertAnswer]) -> list[dict[str, str]]:
        ok = successful(answers)
        user = f"{format_candidates(query, ok)}\n\nReply with only the number (1 to {len(ok)}) of the best answer."
        return [{"role": "system", "content": SELECT_SYSTEM}, {"role": "user", "content": user}]

    def finish(self, query: str, answers: list[ExpertAnswer], model_output: str) -> Aggregation:
        ok = successful(answers)  # numbered in this order by ``prompt``
        extra: dict[str, object] = {"failed": [answer.slug for answer in answers if not answer.ok]}
        found = _INTEGER_RE.search(model_output)
        pick = int(found.group()) if found else None
        if pick is not None and 1 <= pick <= len(ok):
            chosen = ok[pick - 1]
            extra["pick"] = pick
            return Aggregation(
                text=chosen.text,
                chosen=[chosen.slug],
                reason=f"the aggregator model picked answer {pick} of {len(ok)} ({chosen.slug})",
                extra=extra,
            )
        fallback = strongest(ok)
        shown = " ".join(model_output.split())[:80]
        return Aggregation(
            text=fallback.text,
            chosen=[fallback.slug],
            reason=(
                f"the aggregator model's reply {shown!r} names no answer between 1 and {len(ok)}; "
                f"kept the highest-weight answer ({fallback.slug})"
            ),
            extra=extra,
        )
