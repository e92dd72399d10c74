"""The values of one composed request, all immutable: what was asked (``Query``), what will answer it
(``Plan``: the name resolved, a composition's routing decision, its members and aggregator) and what came
back (``Answer``, or ``AnswerStream`` for a streamed one).

A plan is made once per request (``composition.composer.Composer.plan``) and never changed afterwards;
what is only known after the engines ran (failed members, the experts an aggregate came from) is part of
the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregators import Aggregation, Aggregator, ExpertAnswer
from routers.query import RouteDecision
from serving.engine import (
    Choice,
    GenChunk,
    GenerationFailed,
    GenRequest,
    GenResult,
    Guidance,
    Sampling,
    Target,
    TokenTrace,
)


def query_text(messages: list[dict[str, Any]] | None, prompt: str | None) -> str:
    """What routers read: the last user message of a chat, or a completion's prompt."""
    if messages:
        for message in reversed(messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
        return str(messages[-1].get("content") or "")
    return prompt or ""


@dataclass(frozen=True)
class Query:
    """A request as the composition sees it: a model name, a chat (``messages``) or a completion's
    ``prompt``, and the sampling. ``text`` (what routers and aggregators read) is computed once here."""

    model: str
    sampling: Sampling
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    request_id: str = ""
    # the request's own weighted merge of adapters of ``model`` (``merged_adapters`` on /v1): (adapter, weight)
    merged_adapters: tuple[tuple[str, float], ...] | None = None
    guidance: Guidance | None = None  # JSON or tool calls the answer must be
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", query_text(self.messages, self.prompt))

    def generation(
        self,
        target: Target,
        router_bias: tuple[float, ...] | None = None,
        mixture_weights: tuple[float, ...] | None = None,
    ) -> GenRequest:
        """This query as one engine request on ``target``."""
        return GenRequest(
            target,
            self.sampling,
            messages=self.messages,
            prompt=self.prompt,
            request_id=self.request_id,
            router_bias=router_bias,
            mixture_weights=mixture_weights,
            guidance=self.guidance,
        )

    def on_part(self, target: Target, part: str) -> GenRequest:
        """One part of a decomposed query on ``target``: the last user message of a chat replaced by the part
        (system messages stay), or the prompt replaced by it."""
        request = self.generation(target)
        if request.messages is None:
            return dataclasses.replace(request, prompt=part)
        kept = [m for m in request.messages if m.get("role") in ("system", "developer")]
        return dataclasses.replace(request, messages=[*kept, {"role": "user", "content": part}])


@dataclass(frozen=True)
class Member:
    """One chosen expert of a composed answer."""

    slug: str
    weight: float
    target: Target
    part: str | None = None  # a decomposed query: the one part this member answers


@dataclass(frozen=True)
class Plan:
    """What answers a request: one target (an expert, a merged model, a token-level mixture), or two or more
    members and an aggregator; with the routing facts the x-moerge-* headers report."""

    model: str  # the name asked for
    target: Target  # the single answerer; for k > 1, the best-weighted member
    router: str = "none"
    experts: tuple[str, ...] = ()  # what the router chose, and their weights
    weights: tuple[float, ...] = ()
    decision: RouteDecision | None = None
    members: tuple[Member, ...] = ()  # two or more: each answers, then the aggregator combines
    aggregator: Aggregator | None = None
    aggregator_name: str | None = None
    aggregator_target: Target | None = None  # the model a model-based aggregator runs on
    fallback: bool = False
    router_bias: tuple[float, ...] | None = None  # a token-level mixture's per-query bias (glider)
    mixture_weights: tuple[float, ...] | None = None  # a weighted mixture's per-query weights, one per adapter

    @property
    def composite(self) -> bool:
        return len(self.members) > 1

    @property
    def token_level(self) -> bool:
        return self.target.mixture is not None

    @classmethod
    def routing_only(cls, model: str, router: str) -> Plan:
        """What the headers say about a composition before its router has decided (errors while routing)."""
        return cls(model, Target(base_id="", base_dir=Path()), router=router)


def answering(
    plan: Plan, answers: tuple[ExpertAnswer, ...], chosen: list[str]
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The experts a composed answer came from, with their weights: those the aggregation kept (``chosen``),
    else every member that answered. An expert answering several parts is named once, its weights summed."""
    failed = {a.slug for a in answers if not a.ok}
    kept = [m for m in plan.members if m.slug in chosen] or [m for m in plan.members if m.slug not in failed]
    weights: dict[str, float] = {}
    for member in kept:
        weights[member.slug] = weights.get(member.slug, 0.0) + member.weight
    return tuple(weights), tuple(round(w, 6) for w in weights.values())


@dataclass(frozen=True)
class Answer:
    """A finished answer: the plan it ran, its text and usage (every generation's tokens summed, the
    aggregator's included), and for a composed answer each member's own answer, who failed and how the
    aggregate was made. ``experts`` / ``weights``: what the answer came from (the headers name them)."""

    plan: Plan
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    members: tuple[ExpertAnswer, ...] = ()
    aggregation: Aggregation | None = None
    trace: TokenTrace | None = None
    # the answers with their tool calls and log-probabilities (n of them; one for a composed answer)
    choices: tuple[Choice, ...] = ()

    @classmethod
    def of(
        cls, plan: Plan, result: GenResult, experts: tuple[str, ...], weights: tuple[float, ...], **rest: Any
    ) -> Answer:
        """The answer one generation wrote (its text, finish reason and usage)."""
        return cls(
            plan,
            result.text,
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            experts,
            weights,
            choices=result.all_choices(),
            **rest,
        )

    @property
    def failed(self) -> tuple[str, ...]:
        """Members whose generation failed, each named once."""
        return tuple(dict.fromkeys(a.slug for a in self.members if not a.ok))

    def all_choices(self) -> tuple[Choice, ...]:
        return self.choices or (Choice(0, self.text, self.finish_reason),)


@dataclass(frozen=True)
class AnswerStream:
    """A streamed answer, started: its ``first`` chunk has arrived (so a failure to start is still an error
    before any byte is sent), the ``rest`` follows. ``failed`` / ``experts`` / ``weights`` as in ``Answer``
    (a composition's members answered before its aggregate streams)."""

    plan: Plan
    first: GenChunk
    rest: AsyncIterator[GenChunk]
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    failed: tuple[str, ...] = ()

    async def chunks(self) -> AsyncIterator[GenChunk]:
        """Every chunk, the first included."""
        yield self.first
        async for chunk in self.rest:
            yield chunk


class MembersFailed(GenerationFailed):
    """Every chosen expert of a composition failed; ``failed`` names them (the x-moerge-failed header)."""

    def __init__(self, message: str, failed: tuple[str, ...]) -> None:
        super().__init__(message, param="model")
        self.failed = failed
