"""Global (query-level) routers; importing this package registers every one of them in ``ROUTERS``."""

from routers.query import direct, embedding, instruct, kshot, skills, two_step
from routers.query.base import ROUTERS, Candidate, GlobalRouter, RouteDecision, RouterConfig, RouterContext

__all__ = [
    "ROUTERS",
    "Candidate",
    "GlobalRouter",
    "RouteDecision",
    "RouterConfig",
    "RouterContext",
    "direct",
    "embedding",
    "instruct",
    "kshot",
    "skills",
    "two_step",
]
