"""Compositions: named composed systems, queried by name like any model.

A composition names a router (with its parameters), how many experts answer (k), an aggregator and a
fallback. Which routers exist, and what their parameters mean, is the routers' business: this service
asks the router registry to validate them, and keeps the member experts as rows so that an expert in
use cannot silently disappear.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from aggregators import AGGREGATORS
from core.errors import Conflict, NotFound, ValidationFailed
from registry.models import Composition, CompositionMember, Expert, ExpertKind, utcnow
from registry.schemas import check_slug
from registry.services import ExpertService
from registry.store import ArtifactStore
from routers.query import ROUTERS


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
    decompose: bool = False  # route each numbered part of a query to its own expert (needs `synthesize`)


class CompositionPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    router: str | None = None
    router_params: dict[str, Any] | None = None
    experts: list[str] | None = None
    k: int | None = None
    aggregator: str | None = None
    aggregator_params: dict[str, Any] | None = None
    fallback: str | None = None
    description: str | None = None
    decompose: bool | None = None


def _check_mixable(members: list[Expert], what: str) -> None:
    """Members mixed inside one model (a token-level router, the ``weighted`` aggregator) must be LoRA adapters
    of one base."""
    for i, expert in enumerate(members):
        if (expert.peft_type or "").upper() != "LORA" or expert.base_id is None:
            raise ValidationFailed(
                f"{expert.slug!r} is a {expert.kind} model, not a LoRA adapter: {what} mixes adapters of one base",
                param=f"experts[{i}]",
            )
        if expert.base_id != members[0].base_id:
            raise ValidationFailed(
                f"{expert.slug!r} adapts another base than {members[0].slug!r}: {what} mixes adapters of one base",
                param=f"experts[{i}]",
            )


def _check_fusable(spec: CompositionSpec, members: list[Expert]) -> None:
    """An aggregator that fuses logits (``logit_fusion``) decodes k >= 2 chosen experts together in one base
    model's batch: every candidate must be that base or a LoRA adapter of it (one tokenizer, one model)."""
    if spec.k < 2:
        raise ValidationFailed(f"aggregator {spec.aggregator!r} fuses k >= 2 experts, got k = {spec.k}", param="k")
    first: uuid.UUID | None = None
    for i, expert in enumerate(members):
        if expert.kind == ExpertKind.base.value:
            base_id = expert.id
        elif expert.peft_type and expert.base_id is not None and not expert.use_dora:
            base_id = expert.base_id  # a LoRA adapter (or a merged LoRA): runs on its base
        else:
            raise ValidationFailed(
                f"aggregator {spec.aggregator!r}: expert {expert.slug!r} ({expert.kind}) is neither a base model nor "
                "a LoRA adapter of one; only those can decode together",
                param=f"experts[{i}]",
            )
        if first is None:
            first = base_id
        elif base_id != first:
            raise ValidationFailed(
                f"aggregator {spec.aggregator!r}: expert {expert.slug!r} runs on another base model than "
                f"{members[0].slug!r}; fused experts must share one base (and its tokenizer)",
                param=f"experts[{i}]",
            )


PrepareHook = Callable[[CompositionSpec, list[Expert]], Awaitable[None]]
"""Runs after validation and before the commit (the API fits the router's states here): if it raises,
nothing is written."""


class CompositionService:
    def __init__(self, session: AsyncSession, store: ArtifactStore) -> None:
        self.session = session
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
        from routers.token import TOKEN_ROUTERS  # imports torch: not at module level, the CLI imports this module

        if spec.router in TOKEN_ROUTERS:
            return await self._validated_token_level(spec)
        if spec.router not in ROUTERS:
            raise ValidationFailed(
                f"unknown router {spec.router!r}; query-level: {', '.join(ROUTERS.names())}; "
                f"token-level: {', '.join(TOKEN_ROUTERS.names())}",
                param="router",
            )
        router = ROUTERS.get(spec.router).cls
        ROUTERS.config(spec.router, spec.router_params)
        if len(spec.experts) < router.min_experts:
            raise ValidationFailed(
                f"router {spec.router!r} needs at least {router.min_experts} expert(s)", param="experts"
            )
        if router.max_experts is not None and len(spec.experts) > router.max_experts:
            raise ValidationFailed(
                f"router {spec.router!r} takes at most {router.max_experts} expert(s)", param="experts"
            )
        if len(set(spec.experts)) != len(spec.experts):
            raise ValidationFailed("an expert is listed twice", param="experts")
        if not 1 <= spec.k <= max(len(spec.experts), 1):
            raise ValidationFailed(f"k must be between 1 and the number of experts, got {spec.k}", param="k")
        members = [await self.experts.get(ref, param=f"experts[{i}]") for i, ref in enumerate(spec.experts)]
        fallback = await self.experts.get(spec.fallback, param="fallback") if spec.fallback else None
        if spec.decompose and (spec.aggregator is None or not AGGREGATORS.get(spec.aggregator).cls.combines_parts):
            able = ", ".join(n for n in AGGREGATORS.names() if AGGREGATORS.get(n).cls.combines_parts)
            raise ValidationFailed(
                f"decompose needs an aggregator that combines the parts' answers ({able}), "
                f"got {spec.aggregator or 'none'}",
                param="aggregator",
            )
        if spec.aggregator is None:
            if spec.aggregator_params:
                raise ValidationFailed("aggregator_params given without an aggregator", param="aggregator_params")
            if spec.k > 1:
                raise ValidationFailed("k > 1 needs an aggregator to combine the answers", param="aggregator")
        else:
            aggregator = AGGREGATORS.build(spec.aggregator, spec.aggregator_params)
            model = aggregator.model_slug()
            if aggregator.uses_model and model is None and fallback is None:
                raise ValidationFailed(
                    f"aggregator {spec.aggregator!r} needs a model: set aggregator_params.model or a fallback",
                    param="aggregator_params.model",
                )
            if model is not None:
                await self.experts.get(model, param="aggregator_params.model")
            if aggregator.fuses_logits:
                _check_fusable(spec, members)
            if aggregator.merges_adapters:
                _check_mixable(members, f"aggregator {spec.aggregator!r}")
                for slug in getattr(aggregator.config, "always_on", {}):
                    if slug not in {m.slug for m in members}:
                        raise ValidationFailed(
                            f"always_on names {slug!r}, which is not one of the composition's experts",
                            param=f"aggregator_params.always_on.{slug}",
                        )
        return members, fallback

    async def _validated_token_level(self, spec: CompositionSpec) -> tuple[list[Expert], Expert | None]:
        """A token-level router mixes LoRA adapters of one base inside one model: one answer (k = 1), no
        aggregator, no decomposition; how many adapters act on each token is the router's ``top_k``."""
        from routers.token import TOKEN_ROUTERS

        TOKEN_ROUTERS.config(spec.router, spec.router_params)
        if not spec.experts:
            raise ValidationFailed(f"router {spec.router!r} mixes at least one LoRA adapter", param="experts")
        if len(set(spec.experts)) != len(spec.experts):
            raise ValidationFailed("an expert is listed twice", param="experts")
        if spec.k != 1:
            raise ValidationFailed(
                f"k must be 1 with the token-level router {spec.router!r} (one model answers; router_params.top_k "
                f"sets how many adapters act on each token), got {spec.k}",
                param="k",
            )
        if spec.aggregator is not None or spec.aggregator_params:
            raise ValidationFailed(
                f"the token-level router {spec.router!r} mixes adapters inside one model: no aggregator",
                param="aggregator",
            )
        if spec.decompose:
            raise ValidationFailed("decompose needs a query-level router", param="decompose")
        members = [await self.experts.get(ref, param=f"experts[{i}]") for i, ref in enumerate(spec.experts)]
        _check_mixable(members, f"router {spec.router!r}")
        fallback = await self.experts.get(spec.fallback, param="fallback") if spec.fallback else None
        return members, fallback

    async def create(self, spec: CompositionSpec, *, prepare: PrepareHook | None = None) -> Composition:
        check_slug(spec.name, param="name")
        if await self.find(spec.name) is not None:
            raise Conflict(f"a composition named {spec.name!r} already exists", param="name")
        if await self.experts.find(spec.name) is not None:
            raise Conflict(f"{spec.name!r} is already the name of an expert", param="name")
        members, fallback = await self._validated(spec)
        if prepare is not None:
            await prepare(spec, members)
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
            decompose=spec.decompose,
        )
        comp.members = [CompositionMember(expert_id=e.id) for e in members]
        comp.declared_experts = [e.slug for e in members]
        self.session.add(comp)
        try:
            await self.session.commit()
        except IntegrityError as exc:
            await self.session.rollback()
            raise Conflict(f"a composition named {spec.name!r} already exists", param="name") from exc
        await self.session.refresh(comp)
        return comp

    async def update(self, name: str, patch: CompositionPatch, *, prepare: PrepareHook | None = None) -> Composition:
        comp = await self.get(name)
        current = await self.describe(comp)
        changes = {f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not None}
        if not changes:
            raise ValidationFailed("nothing to change: give at least one field", param="body")
        spec = msgspec.convert({**current, **changes, "name": comp.name}, CompositionSpec)
        members, fallback = await self._validated(spec)
        if prepare is not None:
            await prepare(spec, members)
            # Fitting may close the session (no connection held while a model runs): read the row again.
            comp = await self.get(name)
        comp.router, comp.router_params, comp.k = spec.router, dict(spec.router_params), spec.k
        comp.aggregator, comp.aggregator_params = spec.aggregator, dict(spec.aggregator_params)
        comp.fallback_id = fallback.id if fallback else None
        comp.description = spec.description
        comp.decompose = spec.decompose
        comp.members = [CompositionMember(expert_id=e.id) for e in members]
        comp.declared_experts = [e.slug for e in members]
        comp.updated_at = utcnow()
        await self.session.commit()
        await self.session.refresh(comp)
        return comp

    async def delete(self, name: str) -> None:
        comp = await self.get(name)
        await self.session.delete(comp)
        await self.session.commit()

    @staticmethod
    def _declared_order(comp: Composition, members: list[Expert]) -> list[str]:
        slugs = [e.slug for e in members]
        declared = [s for s in comp.declared_experts or [] if s in slugs]
        return declared + sorted(set(slugs) - set(declared))

    async def describe(self, comp: Composition) -> dict[str, Any]:
        fallback = await self.session.get(Expert, comp.fallback_id) if comp.fallback_id else None
        return {
            "name": comp.name,
            "description": comp.description,
            "router": comp.router,
            "router_params": comp.router_params,
            "experts": self._declared_order(comp, await self.member_experts(comp)),
            "k": comp.k,
            "aggregator": comp.aggregator,
            "aggregator_params": comp.aggregator_params,
            "fallback": fallback.slug if fallback else None,
            "decompose": comp.decompose,
        }
