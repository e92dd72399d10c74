"""A composition as routing and serving read it: a plain snapshot of its row (the service that creates and
validates compositions against the routers and aggregators is composition/service.py, above them)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from registry.models import Composition


@dataclass(frozen=True)
class CompositionView:
    """What routing and serving read of a composition: a plain snapshot, safe to memoize and share between
    requests (an ORM row would be tied to the session that loaded it)."""

    id: uuid.UUID
    name: str
    router: str
    router_params: dict[str, Any]
    k: int
    aggregator: str | None
    aggregator_params: dict[str, Any]
    fallback_id: uuid.UUID | None
    decompose: bool
    declared_experts: tuple[str, ...]

    @classmethod
    def of(cls, comp: Composition) -> CompositionView:
        return cls(
            id=comp.id,
            name=comp.name,
            router=comp.router,
            router_params=dict(comp.router_params or {}),
            k=comp.k,
            aggregator=comp.aggregator,
            aggregator_params=dict(comp.aggregator_params or {}),
            fallback_id=comp.fallback_id,
            decompose=bool(comp.decompose),
            declared_experts=tuple(str(s) for s in comp.declared_experts or ()),
        )
