"""From a `model` name to what runs it: an expert's base (+ adapter), or a composition's routed choice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from aggregators import AGGREGATORS, Aggregator
from registry.compositions import CompositionService
from registry.errors import NotFound, Unprocessable, ValidationFailed
from registry.models import Composition, Expert, ExpertKind
from registry.services import ExpertService
from registry.store import ArtifactStore
from routers.query import RouteDecision, RouterContext
from routers.query.parts import part_routes
from routers.query.service import RoutingService
from serving.engine import Target


@dataclass
class Member:
    """One chosen expert of a composed answer."""

    slug: str
    weight: float
    target: Target
    part: str | None = None  # a decomposed query: the one part this member answers


@dataclass
class Resolved:
    """What answers a request, and the routing facts reported in the x-moerge-* headers."""

    model: str
    target: Target  # the single answerer; for k > 1, the best-weighted member
    router: str = "none"
    experts: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    decision: RouteDecision | None = None
    members: list[Member] = field(default_factory=list)  # two or more: answer each, then aggregate
    aggregator: Aggregator | None = None
    aggregator_name: str | None = None
    aggregator_target: Target | None = None
    fallback: bool = False
    failed: list[str] = field(default_factory=list)  # members whose generation failed (set while serving)

    @property
    def composite(self) -> bool:
        return len(self.members) > 1


def target_for(expert: Expert, store: ArtifactStore) -> Target:
    """An adapter (or a merged LoRA) runs on its base's server; a full model runs on its own."""
    if expert.kind == ExpertKind.adapter.value or (expert.kind == ExpertKind.merged.value and expert.peft_type):
        if expert.base is None:
            raise ValidationFailed(f"adapter {expert.slug!r} has no registered base", param="model")
        return Target(
            base_id=str(expert.base.id),
            base_dir=store.expert_dir(expert.base.id),
            adapter_id=str(expert.id),
            adapter_dir=store.expert_dir(expert.id),
            max_lora_rank=int(expert.r or 8),
            served_name=expert.slug,
        )
    return Target(base_id=str(expert.id), base_dir=store.expert_dir(expert.id), served_name=expert.slug)


async def target_of_slug(session: AsyncSession, store: ArtifactStore, slug: str, *, param: str) -> Target:
    return target_for(await ExpertService(session, store).get(slug, param=param), store)


def routing_only(comp: Composition) -> Resolved:
    """What the headers say about a composition before its router has decided (errors while routing)."""
    return Resolved(comp.name, Target(base_id="", base_dir=Path()), router=comp.router)


async def resolve_composition(
    session: AsyncSession, store: ArtifactStore, comp: Composition, query: str, context: RouterContext
) -> Resolved:
    decision = await RoutingService(session, context).decide(comp, query)
    experts = ExpertService(session, store)
    if decision.fallback:
        if comp.fallback_id is None:
            raise Unprocessable(
                f"no expert of composition {comp.name!r} fits this query ({decision.reason}) and it has no fallback",
                param="model",
                code="no_expert_fits",
            )
        fallback = await experts.get(str(comp.fallback_id), param="fallback")
        return Resolved(
            comp.name, target_for(fallback, store), comp.router, [fallback.slug], [1.0], decision, fallback=True
        )
    members = await _members(session, store, comp, decision)
    resolved = Resolved(
        comp.name, members[0].target, comp.router, decision.slugs, decision.weights, decision, members=members
    )
    if resolved.composite:
        if comp.aggregator is None:
            raise ValidationFailed(f"composition {comp.name!r} has k > 1 but no aggregator", param="model")
        aggregator = AGGREGATORS.build(comp.aggregator, dict(comp.aggregator_params or {}))
        resolved.aggregator, resolved.aggregator_name = aggregator, comp.aggregator
        if aggregator.uses_model:
            model = aggregator.model_slug()
            if model is not None:
                resolved.aggregator_target = await target_of_slug(
                    session, store, model, param="aggregator_params.model"
                )
            elif comp.fallback_id is not None:
                fallback = await experts.get(str(comp.fallback_id), param="fallback")
                resolved.aggregator_target = target_for(fallback, store)
            else:
                raise ValidationFailed(
                    f"composition {comp.name!r}: aggregator {comp.aggregator!r} has no model (set one, or a fallback)",
                    param="model",
                )
    return resolved


async def _members(
    session: AsyncSession, store: ArtifactStore, comp: Composition, decision: RouteDecision
) -> list[Member]:
    """The chosen experts; for a decomposed query, one member per part (the fallback answers a part no
    expert fits)."""
    routes = part_routes(decision)
    if not routes:
        return [
            Member(slug, weight, await target_of_slug(session, store, slug, param="model"))
            for slug, weight in decision.experts
        ]
    members = []
    for route in routes:
        if route.expert is None:
            if comp.fallback_id is None:
                raise Unprocessable(
                    f"no expert of composition {comp.name!r} fits the part {route.text!r} ({route.reason}) "
                    "and it has no fallback",
                    param="model",
                    code="no_expert_fits",
                )
            fallback = await ExpertService(session, store).get(str(comp.fallback_id), param="fallback")
            members.append(Member(fallback.slug, 1 / len(routes), target_for(fallback, store), route.text))
        else:
            target = await target_of_slug(session, store, route.expert, param="model")
            members.append(Member(route.expert, 1 / len(routes), target, route.text))
    return members


async def resolve_model(
    session: AsyncSession,
    store: ArtifactStore,
    name: str,
    *,
    query: str = "",
    context: RouterContext | None = None,
    on_composition: Callable[[Resolved], None] | None = None,
) -> Resolved:
    """``on_composition`` hears what is known of a composition before its router runs, so that an error
    while routing still carries the composition's router in the response headers."""
    comp = await CompositionService(session, store).find(name)
    if comp is not None:
        if on_composition is not None:
            on_composition(routing_only(comp))
        if context is None:
            raise ValidationFailed("compositions need a router context (embedder, engine)", param="model")
        return await resolve_composition(session, store, comp, query, context)
    found = await ExpertService(session, store).find(name)
    if found is None:
        raise NotFound(f"The model `{name}` does not exist", param="model", code="model_not_found")
    return Resolved(name, target_for(found, store), "none", [found.slug], [1.0])
