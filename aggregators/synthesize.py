"""``synthesize`` (Mixture-of-Agents, Symbolic-MoE): an aggregator model reads the query and the experts'
answers, told that some may be wrong, and writes one refined answer.

This module only builds the messages and reads the model's output; the serving layer runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregators.base import AGGREGATORS, Aggregation, Aggregator, AggregatorConfig, ExpertAnswer, require
from aggregators.vote import strongest, successful
from registry.schemas import SLUG_RE, SLUG_RULE

MAX_TOKENS_LIMIT = 32768  # more new tokens than any aggregator model here can write
MAX_INSTRUCTIONS_CHARS = 4000

SYNTHESIZE_SYSTEM = (
    "You are given a question and several candidate answers to it, written by different experts. "
    "Some of the candidates may be wrong, incomplete or contradict each other. Evaluate them critically, "
    "use what is correct in them, and write one correct, concise final answer to the question. "
    "Write it as your own answer: do not mention the candidates, the experts or this comparison."
)


# Short and literal on purpose: the 135M demo base copied only the first part's answer, or "corrected" a
# right one, with longer instructions (18 of 20 composite queries right with this one, 2 of 12 or fewer
# with the others tried).
PARTS_SYSTEM = "Experts answered the parts of the user's question; an answer may be wrong."
PARTS_REQUEST = "Check these answers and write the final answers, one per line, numbered like the questions."


def format_parts(query: str, answers: Sequence[ExpertAnswer]) -> str:
    """The user message for a decomposed query: the query, each part's answer by number, the request."""
    said = [answer.text.strip() if answer.ok else "(no answer)" for answer in answers]
    numbered = "\n".join(f"{number}. {text}" for number, text in enumerate(said, start=1))
    return f"{query.strip()}\n\nExperts answered each part:\n{numbered}\n\n{PARTS_REQUEST}"


def format_candidates(query: str, answers: Sequence[ExpertAnswer]) -> str:
    """The user message: the query, then the answers numbered from 1 (in the order given)."""
    parts = [f"Question:\n{query.strip()}", "Candidate answers:"]
    parts += [f"[{number}]\n{answer.text.strip()}" for number, answer in enumerate(answers, start=1)]
    return "\n\n".join(parts)


def check_model(model: str | None) -> None:
    require(model is None or bool(SLUG_RE.match(model)), "model", f"not a valid expert slug: {SLUG_RULE}")


class SynthesizeConfig(AggregatorConfig, frozen=True):
    """Parameters of ``synthesize``.

    model: slug of the expert that writes the synthesis (None: the composition's fallback model).
    max_tokens: new tokens the synthesis may have (None: the request's max_tokens).
    instructions: extra text appended to the system message, e.g. a house style (None: none).
    """

    model: str | None = None
    max_tokens: int | None = None
    instructions: str | None = None

    def check(self) -> None:
        check_model(self.model)
        require(
            self.max_tokens is None or 1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
            "max_tokens",
            f"must be between 1 and {MAX_TOKENS_LIMIT}",
        )
        require(
            self.instructions is None or 0 < len(self.instructions.strip()) <= MAX_INSTRUCTIONS_CHARS,
            "instructions",
            f"must be non-blank text of at most {MAX_INSTRUCTIONS_CHARS} characters",
        )


@AGGREGATORS.register
class Synthesize(Aggregator):
    name = "synthesize"
    config_cls = SynthesizeConfig
    help = "An aggregator model reads every expert's answer (some may be wrong) and writes one refined answer."
    uses_model = True
    streams_output = True  # the model's output is the answer as written
    combines_parts = True

    config: SynthesizeConfig

    def max_tokens(self, requested: int) -> int:
        return self.config.max_tokens if self.config.max_tokens is not None else requested

    def prompt(self, query: str, answers: list[ExpertAnswer]) -> list[dict[str, str]]:
        parts = any(answer.part is not None for answer in answers)
        system = PARTS_SYSTEM if parts else SYNTHESIZE_SYSTEM
        if self.config.instructions is not None:
            system = f"{system}\n\n{self.config.instructions.strip()}"
        user = format_parts(query, answers) if parts else format_candidates(query, successful(answers))
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def finish(self, query: str, answers: list[ExpertAnswer], model_output: str) -> Aggregation:
        ok = successful(answers)
        failed = [answer.slug for answer in answers if not answer.ok]
        text = model_output.strip()
        if not text and any(answer.part is not None for answer in ok):
            return Aggregation(
                text="\n".join(answer.text.strip() for answer in ok),
                chosen=[answer.slug for answer in ok],
                reason="the aggregator model wrote nothing; the parts' answers, one per line",
                extra={"failed": failed},
            )
        if not text:
            fallback = strongest(ok)
            return Aggregation(
                text=fallback.text,
                chosen=[fallback.slug],
                reason="the aggregator model wrote nothing; kept the highest-weight answer",
                extra={"failed": failed},
            )
        return Aggregation(
            text=text,
            chosen=[answer.slug for answer in ok],
            reason=f"synthesized from {len(ok)} expert answer{'s' if len(ok) != 1 else ''}",
            extra={"failed": failed},
        )
