"""Compositions: named composed systems, queried by name like any model.

A composition names a router (with its parameters), how many experts answer (k), an aggregator and a
fallback. Which routers exist, and what their parameters mean, is the routers' business: this service
asks the router registry to validate them, and keeps the member experts as rows so that an expert in
use cannot silently disappear.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import Conflict, NotFound, ValidationFailed
from registry.models import Composition, CompositionMember, Expert, utcnow
from registry.schemas import check_slug
from registry.services import ExpertService
from registry.store import ArtifactStore


class CompositionSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    router: str = "direct"
    router_params: dict[str, Any] = msgspec.field(default_factory=dict)
    experts: list[str] = msgspec.field(default_factory=list)  # candidates (slugs); `direct` takes one
    k: int = 1
    aggregator: str | None = None
    aggregator_params: dict[str, Any] = msgspec.field(default_factory=dict)
    fallback: str | None = None
    description: str = ""


class CompositionPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    router: str | None = None
    router_params: dict[str, Any] | None = None
    experts: list[str] | None = None
    k: int | None = None
    aggregator: str | None = None
    aggregator_params: dict[str, Any] | None = None
    fallback: str | None = None
    description: str | None = None


@dataclass
class RouterRule:
    """What the composition service needs to know of a router to validate a composition."""

    min_experts: int = 1
    max_experts: int | None = None
    max_k: int | None = None
    check_params: Callable[[dict[str, Any]], None] = lambda _params: None


@dataclass
class RouterRules:
    rules: dict[str, RouterRule] = field(default_factory=dict)

    def get(self, name: str) -> RouterRule:
        if name not in self.rules:
            known = ", ".join(sorted(self.rules)) or "none"
            raise ValidationFailed(f"unknown router {name!r}; known: {known}", param="router")
        return self.rules[name]


def _no_params(params: dict[str, Any]) -> None:
    if params:
        raise ValidationFailed(f"router `direct` takes no parameters; got {sorted(params)}", param="router_params")


# Routers register their rules here; `direct` (one named expert answers everything) is built in.
ROUTER_RULES = RouterRules({"direct": RouterRule(min_experts=1, max_experts=1, max_k=1, check_params=_no_params)})


class CompositionService:
    def __init__(self, session: AsyncSession, store: ArtifactStore, rules: RouterRules = ROUTER_RULES) -> None:
        self.session = session
        self.rules = rules
        self.experts = ExpertService(session, store)

    async def find(self, name: str) -> Composition | None:
        return await self.session.scalar(select(Composition).where(Composition.name == name))

    async def get(self, name: str) -> Composition:
        comp = await self.find(name)
        if comp is None:
            raise NotFound(f"no composition named {name!r}", param="composition", code="composition_not_found")
        return comp

    async def list_compositions(self) -> list[Composition]:
        return list(await self.session.scalars(select(Composition).order_by(Composition.name)))

    async def member_experts(self, comp: Composition) -> list[Expert]:
        ids = [m.expert_id for m in comp.members]
        if not ids:
            return []
        experts = {e.id: e for e in await self.session.scalars(select(Expert).where(Expert.id.in_(ids)))}
        return [experts[i] for i in ids if i in experts]

    async def _validated(self, spec: CompositionSpec) -> tuple[list[Expert], Expert | None]:
        rule = self.rules.get(spec.router)
        rule.check_params(spec.router_params)
        if len(spec.experts) < rule.min_experts:
            raise ValidationFailed(
                f"router {spec.router!r} needs at least {rule.min_experts} expert(s)", param="experts"
            )
        if rule.max_experts is not None and len(spec.experts) > rule.max_experts:
            raise ValidationFailed(
                f"router {spec.router!r} takes at most {rule.max_experts} expert(s)", param="experts"
            )
        if spec.k < 1 or (rule.max_k is not None and spec.k > rule.max_k) or spec.k > max(len(spec.experts), 1):
            raise ValidationFailed(f"k = {spec.k} does not fit router {spec.router!r} and its experts", param="k")
        if len(set(spec.experts)) != len(spec.experts):
            raise ValidationFailed("an expert is listed twice", param="experts")
        members = [await self.experts.get(ref, param=f"experts[{i}]") for i, ref in enumerate(spec.experts)]
        fallback = await self.experts.get(spec.fallback, param="fallback") if spec.fallback else None
        return members, fallback

    async def create(self, spec: CompositionSpec) -> Composition:
        check_slug(spec.name, param="name")
        if await self.find(spec.name) is not None:
            raise Conflict(f"a composition named {spec.name!r} already exists", param="name")
        if await self.experts.find(spec.name) is not None:
            raise Conflict(f"{spec.name!r} is already the name of an expert", param="name")
        members, fallback = await self._validated(spec)
        comp = Composition(
            id=uuid.uuid4(),
            name=spec.name,
            description=spec.description,
            router=spec.router,
            router_params=dict(spec.router_params),
            k=spec.k,
            aggregator=spec.aggregator,
            aggregator_params=dict(spec.aggregator_params),
            fallback_id=fallback.id if fallback else None,
        )
        comp.members = [CompositionMember(expert_id=e.id) for e in members]
        self.session.add(comp)
        try:
            await self.session.commit()
        except IntegrityError as exc:
            await self.session.rollback()
            raise Conflict(f"a composition named {spec.name!r} already exists", param="name") from exc
        await self.session.refresh(comp)
        return comp

    async def update(self, name: str, patch: CompositionPatch) -> Composition:
        comp = await self.get(name)
        current = await self.describe(comp)
        changes = {f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not None}
        if not changes:
            raise ValidationFailed("nothing to change: give at least one field", param="body")
        spec = msgspec.convert({**current, **changes, "name": comp.name}, CompositionSpec)
        members, fallback = await self._validated(spec)
        comp.router, comp.router_params, comp.k = spec.router, dict(spec.router_params), spec.k
        comp.aggregator, comp.aggregator_params = spec.aggregator, dict(spec.aggregator_params)
        comp.fallback_id = fallback.id if fallback else None
        comp.description = spec.description
        comp.members = [CompositionMember(expert_id=e.id) for e in members]
        comp.updated_at = utcnow()
        await self.session.commit()
        await self.session.refresh(comp)
        return comp

    async def delete(self, name: str) -> None:
        comp = await self.get(name)
        await self.session.delete(comp)
        await self.session.commit()

    async def describe(self, comp: Composition) -> dict[str, Any]:
        fallback = await self.session.get(Expert, comp.fallback_id) if comp.fallback_id else None
        return {
            "name": comp.name,
            "description": comp.description,
            "router": comp.router,
            "router_params": comp.router_params,
            "experts": [e.slug for e in await self.member_experts(comp)],
            "k": comp.k,
            "aggregator": comp.aggregator,
            "aggregator_params": comp.aggregator_params,
            "fallback": fallback.slug if fallback else None,
        }
