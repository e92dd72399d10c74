"""From a `model` name to what runs it: an expert's base (+ adapter), or a composition's routed choice."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from aggregators import AGGREGATORS
from composition.plan import Member, Plan
from composition.service import CompositionService
from core import tracing
from core.errors import NotFound, Unprocessable, ValidationFailed
from registry.chat_templates import chat_template_text
from registry.compositions import CompositionView
from registry.epoch import Stamp, StampedMemo, registry_stamp
from registry.limits import MAX_LORA_RANK, largest_rank, row_fault, unservable_message
from registry.models import Expert, ExpertKind
from registry.schemas import TOOL_PARSERS
from registry.services import ExpertService
from registry.store import ArtifactStore
from routers.query import RouteDecision, RouterContext
from routers.query.parts import part_routes
from routers.query.service import RoutingService
from serving.engine import Target

log = logging.getLogger(__name__)


def served_settings(server: Expert) -> dict[str, Any]:
    """The Target fields of the model whose server runs a request (a base, or a full model served on its own):
    its chat template's text (None: the model's own) and its vLLM tool-call parser. A name this moerge does not
    ship or know (a row written by another version) is left out, with a warning, rather than failing requests
    or the server's start."""
    template: str | None = None
    if server.chat_template is not None:
        try:
            template = chat_template_text(server.chat_template)
        except KeyError:
            log.warning("%s: chat template %r is not shipped with this moerge; using the model's own",
                        server.slug, server.chat_template)  # fmt: skip
    parser = server.tool_parser
    if parser is not None and parser not in TOOL_PARSERS:
        log.warning("%s: tool parser %r is not one vLLM has; serving without one", server.slug, parser)
        parser = None
    return {"chat_template": template, "tool_parser": parser}


def _target_or_refusal(expert: Expert, store: ArtifactStore, max_lora_rank: int) -> Target | str:
    """An adapter (or a merged LoRA) runs on its base's server; a full model runs on its own. A LoRA row
    that cannot be served (a rank above ``max_lora_rank``, a pattern key or alpha registration now refuses:
    registry/limits.py) gives the message it is refused with instead, per request and never at start-up."""
    if expert.kind == ExpertKind.adapter.value or (expert.kind == ExpertKind.merged.value and expert.peft_type):
        if expert.base is None:
            raise ValidationFailed(f"adapter {expert.slug!r} has no registered base", param="model")
        fault = row_fault(expert, max_lora_rank)
        if fault is not None:
            return unservable_message(expert.slug, fault, max_lora_rank)
        return Target(
            base_id=str(expert.base.id),
            base_dir=store.expert_dir(expert.base.id),
            adapter_id=str(expert.id),
            adapter_dir=store.expert_dir(expert.id),
            max_lora_rank=largest_rank(expert.r, expert.rank_pattern) or 8,  # rank_pattern values count too
            served_name=expert.slug,
            **served_settings(expert.base),  # the base's server, so the base's template and parser
        )
    return Target(
        base_id=str(expert.id), base_dir=store.expert_dir(expert.id), served_name=expert.slug, **served_settings(expert)
    )


def _served(found: Target | str, param: str) -> Target:
    if isinstance(found, str):
        raise Unprocessable(found, param=param, code="adapter_unservable")
    return found


def target_for(
    expert: Expert, store: ArtifactStore, *, max_lora_rank: int = MAX_LORA_RANK, param: str = "model"
) -> Target:
    """What runs ``expert``; ``Unprocessable`` naming ``param``, the adapter and the fix if it cannot be served."""
    return _served(_target_or_refusal(expert, store, max_lora_rank), param)


# Memoized under the registry stamp (registry/epoch.py): resolving a model name or a chosen expert reads
# one row while nothing in the registry changes, instead of 7 statements (~5 ms) per request. A refusal
# (an unservable adapter) is memoized as its message, so repeating a refused request costs no statements.
_NAMES = StampedMemo[CompositionView | tuple[str, Target | str]](4096)  # model name -> composition, or expert
_EXPERTS = StampedMemo[tuple[str, Target | str]](4096)  # expert slug / id / alias -> (slug, target or refusal)


async def expert_target(
    session: AsyncSession,
    store: ArtifactStore,
    ref: str,
    *,
    param: str,
    stamp: Stamp | None = None,
    max_lora_rank: int = MAX_LORA_RANK,
) -> tuple[str, Target]:
    """(slug, target) of an expert by slug, id or alias; NotFound naming ``param``, or Unprocessable if it
    cannot be served under ``max_lora_rank`` (MOERGE_MAX_LORA_RANK)."""
    key = (str(store.root), ref, max_lora_rank)
    found = _EXPERTS.get(stamp, key)
    if found is None:
        expert = await ExpertService(session, store).get(ref, param=param)
        found = _EXPERTS.put(stamp, key, (expert.slug, _target_or_refusal(expert, store, max_lora_rank)))
    slug, target = found
    return slug, _served(target, param)


async def target_of_slug(
    session: AsyncSession,
    store: ArtifactStore,
    slug: str,
    *,
    param: str,
    stamp: Stamp | None = None,
    max_lora_rank: int = MAX_LORA_RANK,
) -> Target:
    return (await expert_target(session, store, slug, param=param, stamp=stamp, max_lora_rank=max_lora_rank))[1]


async def find_composition(
    session: AsyncSession, store: ArtifactStore, name: str, stamp: Stamp | None = None
) -> CompositionView | None:
    found = await _find_model(session, store, name, stamp, MAX_LORA_RANK)
    return found if isinstance(found, CompositionView) else None


async def _find_model(
    session: AsyncSession, store: ArtifactStore, name: str, stamp: Stamp | None, max_lora_rank: int
) -> CompositionView | tuple[str, Target | str] | None:
    key = (str(store.root), name, max_lora_rank)
    found = _NAMES.get(stamp, key)
    if found is not None:
        return found
    comp = await CompositionService(session, store).find(name)
    if comp is not None:
        return _NAMES.put(stamp, key, CompositionView.of(comp))
    expert = await ExpertService(session, store).find(name)
    if expert is None:
        return None
    return _NAMES.put(stamp, key, (expert.slug, _target_or_refusal(expert, store, max_lora_rank)))


def routing_only(comp: CompositionView) -> Plan:
    """What the headers say about a composition before its router has decided (errors while routing)."""
    return Plan.routing_only(comp.name, comp.router)


async def resolve_composition(
    session: AsyncSession,
    store: ArtifactStore,
    comp: CompositionView,
    query: str,
    context: RouterContext,
    stamp: Stamp | None = None,
    *,
    max_lora_rank: int = MAX_LORA_RANK,
) -> Plan:
    """``comp``'s plan for ``query``, in a ``route`` span that records the router's decision."""
    attributes = {tracing.COMPOSITION: comp.name, tracing.ROUTER: comp.router}
    with tracing.tracer.start_as_current_span("route", attributes=attributes) as span:
        plan = await _resolve_composition(session, store, comp, query, context, stamp, max_lora_rank=max_lora_rank)
        if span.is_recording():
            span.set_attributes(
                {
                    tracing.ROUTE_LEVEL: "token" if plan.token_level else "query",
                    tracing.ROUTE_EXPERTS: list(plan.experts),
                    tracing.ROUTE_WEIGHTS: list(plan.weights),
                    tracing.ROUTE_FALLBACK: plan.fallback,
                }
            )
        return plan


async def _resolve_composition(
    session: AsyncSession,
    store: ArtifactStore,
    comp: CompositionView,
    query: str,
    context: RouterContext,
    stamp: Stamp | None,
    *,
    max_lora_rank: int,
) -> Plan:
    stamp = stamp if stamp is not None else await registry_stamp(session)
    from composition import mixtures  # imports this module

    if mixtures.is_token_level(comp.router):
        return await mixtures.resolve_token_composition(
            session, store, comp, query, context, stamp, max_lora_rank=max_lora_rank
        )
    decision = await RoutingService(session, context).decide(comp, query, stamp)
    if decision.fallback:
        if comp.fallback_id is None:
            raise Unprocessable(
                f"no expert of composition {comp.name!r} fits this query ({decision.reason}) and it has no fallback",
                param="model",
                code="no_expert_fits",
            )
        slug, target = await expert_target(
            session, store, str(comp.fallback_id), param="fallback", stamp=stamp, max_lora_rank=max_lora_rank
        )
        return Plan(comp.name, target, comp.router, (slug,), (1.0,), decision, fallback=True)
    if comp.aggregator is not None:
        aggregator = AGGREGATORS.build(comp.aggregator, dict(comp.aggregator_params))
        if aggregator.merges_adapters:  # one generation with the chosen adapters weighted
            return await mixtures.weighted_plan(
                session, store, comp, decision, aggregator, stamp, max_lora_rank=max_lora_rank
            )
    members = await _members(session, store, comp, decision, stamp, max_lora_rank)
    plan = Plan(
        comp.name,
        members[0].target,
        comp.router,
        tuple(decision.slugs),
        tuple(decision.weights),
        decision,
        members=tuple(members),
    )
    if not plan.composite:
        return plan
    if comp.aggregator is None:
        raise ValidationFailed(f"composition {comp.name!r} has k > 1 but no aggregator", param="model")
    aggregator = AGGREGATORS.build(comp.aggregator, dict(comp.aggregator_params))
    aggregator_target = None
    if aggregator.uses_model:
        model = aggregator.model_slug()
        if model is not None:
            aggregator_target = await target_of_slug(
                session, store, model, param="aggregator_params.model", stamp=stamp, max_lora_rank=max_lora_rank
            )
        elif comp.fallback_id is not None:
            aggregator_target = await target_of_slug(
                session, store, str(comp.fallback_id), param="fallback", stamp=stamp, max_lora_rank=max_lora_rank
            )
        else:
            raise ValidationFailed(
                f"composition {comp.name!r}: aggregator {comp.aggregator!r} has no model (set one, or a fallback)",
                param="model",
            )
    return dataclasses.replace(
        plan, aggregator=aggregator, aggregator_name=comp.aggregator, aggregator_target=aggregator_target
    )


async def _members(
    session: AsyncSession,
    store: ArtifactStore,
    comp: CompositionView,
    decision: RouteDecision,
    stamp: Stamp | None,
    max_lora_rank: int,
) -> list[Member]:
    """The chosen experts; for a decomposed query, one member per part (the fallback answers a part no
    expert fits)."""
    routes = part_routes(decision)
    if not routes:
        return [
            Member(
                slug,
                weight,
                await target_of_slug(session, store, slug, param="model", stamp=stamp, max_lora_rank=max_lora_rank),
            )
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
            slug, target = await expert_target(
                session, store, str(comp.fallback_id), param="fallback", stamp=stamp, max_lora_rank=max_lora_rank
            )
        else:
            slug = route.expert
            target = await target_of_slug(session, store, slug, param="model", stamp=stamp, max_lora_rank=max_lora_rank)
        members.append(Member(slug, 1 / len(routes), target, route.text))
    return members


async def resolve_model(
    session: AsyncSession,
    store: ArtifactStore,
    name: str,
    *,
    query: str = "",
    context: RouterContext | None = None,
    on_composition: Callable[[Plan], None] | None = None,
    stamp: Stamp | None = None,
    max_lora_rank: int = MAX_LORA_RANK,
) -> Plan:
    """``on_composition`` hears what is known of a composition before its router runs, so that an error
    while routing still carries the composition's router in the response headers. ``stamp``: the registry
    stamp if the caller has read it already (the API's key check reads it in the same statement).
    ``max_lora_rank``: MOERGE_MAX_LORA_RANK; an adapter above it (or otherwise unservable) is refused here."""
    stamp = stamp if stamp is not None else await registry_stamp(session)
    found = await _find_model(session, store, name, stamp, max_lora_rank)
    if found is None:
        raise NotFound(f"The model `{name}` does not exist", param="model", code="model_not_found")
    if isinstance(found, CompositionView):
        if on_composition is not None:
            on_composition(routing_only(found))
        if context is None:
            raise ValidationFailed("compositions need a router context (embedder, engine)", param="model")
        return await resolve_composition(session, store, found, query, context, stamp, max_lora_rank=max_lora_rank)
    slug, target = found
    return Plan(name, _served(target, "model"), "none", (slug,), (1.0,))
