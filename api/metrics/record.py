"""What a planned query records: its model's kind and name on the request (labels of its request metrics and
rollups), a composition's routing decisions and fallbacks, tokens, time to first token and failed members."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.metrics.middleware import facts_of, rollups_of
from composition.plan import Plan
from core.metrics import (
    COMPLETION_TOKENS,
    FALLBACKS,
    FIRST_TOKEN_SECONDS,
    MEMBER_FAILURES,
    PROMPT_TOKENS,
    ROUTER_DECISIONS,
)
from registry.epoch import Stamp, StampedMemo
from registry.models import Expert

COMPOSITION = "composition"

# expert slug -> its kind, under the registry stamp: a request reads nothing more once its model was seen
_KINDS = StampedMemo[str](4096)


async def plan_kind(session: AsyncSession, plan: Plan, stamp: Stamp | None) -> str:
    """``composition``, or the kind of the one expert that answers ``plan``."""
    if plan.router != "none":
        return COMPOSITION
    slug = answerer(plan)
    kind = _KINDS.get(stamp, slug)
    if kind is None:
        kind = _KINDS.put(stamp, slug, await session.scalar(select(Expert.kind).where(Expert.slug == slug)) or "")
    return kind


def answerer(plan: Plan) -> str:
    """The name the metrics give what answers: a composition's name, else the expert's slug (not an alias)."""
    if plan.router != "none" or not plan.experts:
        return plan.model
    return plan.experts[0]


def note_model(request: Request[Any, Any, Any], plan: Plan, kind: str) -> None:
    """Label the request's metrics with ``plan``'s model (a routing-only plan too: its router failed)."""
    facts = facts_of(request)
    if facts is not None:
        facts.kind, facts.model = kind, answerer(plan)


def note_routing(request: Request[Any, Any, Any], plan: Plan) -> None:
    """A composition's decision: each chosen expert (the fallback when it answered), counted once."""
    if plan.router == "none":
        return
    rollups = rollups_of(request.app)
    for slug in plan.experts:
        ROUTER_DECISIONS.labels(composition=plan.model, expert=slug).inc()
        if rollups is not None:
            rollups.route(plan.model, slug)
    if plan.fallback:
        FALLBACKS.labels(composition=plan.model).inc()


def note_failures(plan: Plan, failed: tuple[str, ...]) -> None:
    """Chosen experts of a composition whose generation failed."""
    if plan.router == "none":
        return
    for slug in failed:
        MEMBER_FAILURES.labels(composition=plan.model, expert=slug).inc()


def note_first_token(request: Request[Any, Any, Any]) -> None:
    """A stream's first chunk has arrived: the time since the request did."""
    facts = facts_of(request)
    if facts is not None:
        route = request.scope.get("path_template") or ""
        FIRST_TOKEN_SECONDS.labels(route=route, kind=facts.kind).observe(time.perf_counter() - facts.started)


def note_tokens(kind: str, prompt_tokens: int, completion_tokens: int) -> None:
    PROMPT_TOKENS.labels(kind=kind).inc(max(0, prompt_tokens))
    COMPLETION_TOKENS.labels(kind=kind).inc(max(0, completion_tokens))
