"""`direct`: one named expert answers every query (a composition that is an alias with routing headers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from routers.query.base import ROUTERS, Candidate, GlobalRouter, RouteDecision, RouterConfig


class DirectConfig(RouterConfig, frozen=True):
    """`direct` takes no parameters."""


@ROUTERS.register
class DirectRouter(GlobalRouter):
    name = "direct"
    config_cls = DirectConfig
    help = "always the composition's one expert"
    max_experts: ClassVar[int | None] = 1

    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        return {}

    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        (only,) = candidates
        return RouteDecision(self.name, [(only.slug, 1.0)], {only.slug: 1.0}, f"{only.slug} answers every query")
