"""Routing a query for a composition: its candidates, the router's fitted states, the decision."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict
from registry.compositions import CompositionView
from registry.epoch import Stamp, StampedMemo, registry_stamp
from registry.models import CompositionMember, EvalResult, Expert
from routers.query.base import ROUTERS, Candidate, GlobalRouter, RouteDecision, RouterContext
from routers.query.parts import merge_part_decisions, split_parts
from routers.query.state import RouterStateStore

# composition id -> (router, candidates, prepared state), valid while the registry epoch stands still: a
# request at 10,000 candidates reads one row instead of the member list, and hashes nothing per candidate.
_ROUTING = StampedMemo[tuple[GlobalRouter, list[Candidate], Any]](256)


def candidate_of(expert: Expert, evals: list[EvalResult] | None = None) -> Candidate:
    rows = expert.evals if evals is None else evals
    return Candidate(
        id=str(expert.id),
        slug=expert.slug,
        description=expert.description or "",
        task_description=expert.task_description or "",
        skills=tuple(str(s) for s in expert.skills or ()),
        domains=tuple(str(d) for d in expert.domains or ()),
        example_prompts=tuple(str(p) for p in expert.example_prompts or ()),
        evals=tuple((e.task, e.metric, float(e.value)) for e in rows),
    )


class RoutingService:
    def __init__(self, session: AsyncSession, context: RouterContext) -> None:
        self.session = session
        self.context = context
        self.states = RouterStateStore(session)

    def router_for(self, comp: CompositionView) -> GlobalRouter:
        return ROUTERS.build(comp.router, dict(comp.router_params), self.context)

    async def routing(
        self, comp: CompositionView, stamp: Stamp | None = None
    ) -> tuple[GlobalRouter, list[Candidate], Any]:
        """The composition's router, its candidates in declared order, and the router's prepared state;
        read again only when the registry changed. A member deleted since is a clear error."""
        stamp = stamp if stamp is not None else await registry_stamp(self.session)
        found = _ROUTING.get(stamp, (comp.id, id(self.context)))
        if found is not None:
            return found
        router = self.router_for(comp)
        candidates = await self._load_candidates(comp)
        prepared = await self.states.prepared(router, candidates)
        return _ROUTING.put(stamp, (comp.id, id(self.context)), (router, candidates, prepared))

    async def candidates(self, comp: CompositionView) -> list[Candidate]:
        return (await self.routing(comp))[1]

    async def _load_candidates(self, comp: CompositionView) -> list[Candidate]:
        experts = {
            e.id: e
            for e in await self.session.scalars(
                select(Expert).join(CompositionMember).where(CompositionMember.composition_id == comp.id)
            )
        }
        by_slug = {e.slug: e for e in experts.values()}
        declared = list(comp.declared_experts) or [e.slug for e in experts.values()]
        missing = [s for s in declared if s not in by_slug]
        if missing or not experts:
            gone = ", ".join(missing) or "all of its experts"
            raise Conflict(
                f"composition {comp.name!r} names deleted expert(s): {gone}; update the composition's experts",
                param="model",
                code="composition_expert_deleted",
            )
        return [candidate_of(by_slug[s]) for s in declared]

    async def fit(
        self,
        router_name: str,
        params: dict[str, Any],
        experts: list[Expert],
        on_fitted: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Fit a router's per-expert states now (when a composition is created or changed), so the first
        query does not pay for it and a router that cannot fit fails the change, not the query.
        Returns the slugs fitted (the others were up to date); ``on_fitted(done, total)`` as each is fitted."""
        router = ROUTERS.build(router_name, params, self.context)
        await self.states.prepared(router, [candidate_of(e) for e in experts], on_fitted)
        return self.states.fitted

    async def decide(self, comp: CompositionView, query: str, stamp: Stamp | None = None) -> RouteDecision:
        router, candidates, prepared = await self.routing(comp, stamp)
        # Hold no database connection while the router may wait on a model (`instruct`): many requests
        # waiting at once would otherwise exhaust the pool their own model calls need. The session stays
        # usable; it takes a connection again when next used.
        await self.session.close()
        parts = split_parts(query) if comp.decompose else []
        if not parts:
            return await router.route(query, candidates, prepared, comp.k)
        decisions = await asyncio.gather(*(router.route(part, candidates, prepared, 1) for part in parts))
        return merge_part_decisions(router.name, parts, decisions)
