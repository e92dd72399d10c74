"""Decomposition: a query made of numbered parts, each routed to its own expert.

A composition with ``decompose`` set splits a query whose lines number its parts ("1. ...", "2) ...",
numbered 1, 2, 3 ... in order) and routes every part on its own to its best expert; each expert answers only
its part, and the aggregator (``synthesize``) writes one answer from the query and the parts' answers. A
query without at least two such parts is routed whole, as usual. Text before the first part (an
instruction such as "answer both questions") stays with the whole query, which the aggregator reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from routers.query.base import RouteDecision

MAX_PARTS = 8  # more numbered lines than this is a list to answer whole, not separate questions
_ITEM = re.compile(r"^\s*(\d{1,2})[.)]\s+(\S.*)$")


def split_parts(query: str) -> list[str]:
    """The query's numbered parts (each with its continuation lines), or [] when it has fewer than two."""
    parts: list[list[str]] = []
    for line in query.splitlines():
        item = _ITEM.match(line)
        if item is not None and int(item.group(1)) == len(parts) + 1:
            parts.append([item.group(2).strip()])
        elif parts and line.strip():
            parts[-1].append(line.strip())
    if not 2 <= len(parts) <= MAX_PARTS:
        return []
    return ["\n".join(lines) for lines in parts]


@dataclass(frozen=True)
class PartRoute:
    """Who answers one part: ``expert`` None means the composition's fallback."""

    text: str
    expert: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"text": self.text, "expert": self.expert, "reason": self.reason}


def merge_part_decisions(router: str, parts: Sequence[str], decisions: Sequence[RouteDecision]) -> RouteDecision:
    """One decision for the whole query: each part's best expert (weights = its share of the parts), every
    candidate's best score over the parts, and the per-part routes in ``extra["parts"]``."""
    routes = [
        PartRoute(text, None if d.fallback else d.slugs[0], d.reason) for text, d in zip(parts, decisions, strict=True)
    ]
    shares: dict[str, float] = {}
    for route in routes:
        if route.expert is not None:
            shares[route.expert] = shares.get(route.expert, 0.0) + 1.0 / len(routes)
    scores: dict[str, float] = {}
    for decision in decisions:
        for slug, score in decision.scores.items():
            scores[slug] = max(score, scores.get(slug, score))
    summary = "; ".join(f"part {n} -> {route.expert or 'fallback'}" for n, route in enumerate(routes, start=1))
    return RouteDecision(
        router,
        [(slug, round(share, 6)) for slug, share in shares.items()],
        scores,
        f"{len(routes)} parts, each routed on its own: {summary}",
        fallback=not shares,
        extra={"parts": [route.as_dict() for route in routes]},
    )


def part_routes(decision: RouteDecision) -> list[PartRoute]:
    """The per-part routes of a decision made by :func:`merge_part_decisions` ([] for a whole query)."""
    return [PartRoute(p["text"], p["expert"], p["reason"]) for p in decision.extra.get("parts", [])]
