"""Small view helpers of the admin panel: pagination, the lineage graph, the score bars, form errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from markdown_it import MarkdownIt

from api.schemas import TokenTraceOut
from core.errors import MoergeError, ValidationFailed
from registry.models import Expert
from registry.services import ExpertService

PAGE_SIZE = 20
# Experts a form offers as choices; past this, the form says how many there are and takes typed slugs
# (the services check those like any other).
PICKER_LIMIT = 500
LINEAGE_CHILDREN = 8  # children drawn in the lineage graph; the rest are counted ("and N more")
_MD = MarkdownIt("js-default", {"html": False})  # tables on, raw HTML off: cards are user content


_HEADING = re.compile(r"<(/?)h([1-6])>")


def markdown(text: str | None, *, shift: int = 0) -> str:
    """Markdown as HTML; ``shift`` lowers its headings (a model card inside a page that has its own h1)."""
    html = _MD.render(text or "")
    if shift:
        html = _HEADING.sub(lambda m: f"<{m[1]}h{min(6, int(m[2]) + shift)}>", html)
    return html


@dataclass
class Pager:
    """One page of a long list, with the links to its neighbours (other query parameters kept)."""

    total: int
    offset: int
    limit: int = PAGE_SIZE
    params: dict[str, str] = field(default_factory=dict)

    def _link(self, offset: int) -> str:
        return "?" + urlencode({**{k: v for k, v in self.params.items() if v}, "offset": offset})

    @property
    def prev(self) -> str | None:
        return self._link(max(0, self.offset - self.limit)) if self.offset > 0 else None

    @property
    def next(self) -> str | None:
        return self._link(self.offset + self.limit) if self.offset + self.limit < self.total else None

    @property
    def first_shown(self) -> int:
        return min(self.total, self.offset + 1)

    @property
    def last_shown(self) -> int:
        return min(self.total, self.offset + self.limit)


@dataclass
class FormErrors:
    """A refused form: the message per field (the service's ValidationFailed names it in ``param``)."""

    fields: dict[str, str] = field(default_factory=dict)
    general: str | None = None

    @classmethod
    def of(cls, exc: MoergeError, field_of: dict[str, str], default: str | None = None) -> FormErrors:
        """``field_of`` maps a ``param`` (or its prefix before ``[`` / ``.``) to a form field; params naming
        no field land on ``default`` (or above the form)."""
        param = exc.param or ""
        head = param.split("[", 1)[0].split(".", 1)[0]
        name = field_of.get(param) or field_of.get(head) or default
        named = not param or name == param or exc.message.startswith(param)
        detail = exc.message if named else f"{param}: {exc.message}"
        return cls({name: detail}) if name else cls(general=detail)

    def __bool__(self) -> bool:
        return bool(self.fields or self.general)


def json_object(form: Any, name: str) -> dict[str, Any]:
    """A form field holding a JSON object (empty: ``{}``); anything else is refused beside that field."""
    text = str(form.get(name) or "").strip()
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValidationFailed(f"not valid JSON ({exc.msg})", param=name) from None
    if not isinstance(value, dict):
        raise ValidationFailed("must be a JSON object", param=name)
    return value


def split_slugs(text: str) -> list[str]:
    """Slugs typed into a text field, separated by commas, spaces or lines."""
    return [s for s in re.split(r"[\s,]+", text) if s]


@dataclass
class Picker:
    """The experts a form offers (at most PICKER_LIMIT) and how many match in all."""

    experts: list[Expert]
    total: int

    @property
    def truncated(self) -> bool:
        return self.total > len(self.experts)


async def expert_picker(service: ExpertService, kinds: Iterable[str] | None = None) -> Picker:
    """A bounded list of experts (of ``kinds``, default any) for a form's choices."""
    if kinds is None:
        page = await service.list_experts(limit=PICKER_LIMIT)
        return Picker(page.items, page.total)
    experts: list[Expert] = []
    total = 0
    for kind in kinds:
        page = await service.list_experts(kind=kind, limit=PICKER_LIMIT)
        experts += page.items
        total += page.total
    return Picker(experts[:PICKER_LIMIT], total)


def lineage_svg(expert: Expert, parents: list[str], children: list[str]) -> dict[str, Any]:
    """Nodes and edges of a small left-to-right graph: parents (or the base) -> this expert -> children
    (the first LINEAGE_CHILDREN, then one "and N more" node). The template draws it as inline SVG."""
    left = parents or ([expert.base.slug] if expert.base else [])
    hidden = max(0, len(children) - LINEAGE_CHILDREN)
    children = children[:LINEAGE_CHILDREN] + ([f"and {hidden} more"] if hidden else [])
    rows = max(len(left), len(children), 1)
    height = 20 + rows * 44
    width, box_w = 660, 190

    def column(names: list[str], x: int) -> list[dict[str, Any]]:
        gap = height / (len(names) + 1)
        return [{"label": n, "x": x, "y": round(gap * (i + 1) - 14), "href": n} for i, n in enumerate(names)]

    me: dict[str, Any] = {"label": expert.slug, "x": (width - box_w) // 2, "y": round(height / 2 - 14), "href": None}
    nodes_left = column(left, 5)
    nodes_right = column(children, width - box_w - 5)
    if hidden:
        nodes_right[-1] |= {"href": None, "more": True}
    edges = [(n["x"] + box_w, n["y"] + 14, me["x"], me["y"] + 14) for n in nodes_left]
    edges += [(me["x"] + box_w, me["y"] + 14, n["x"], n["y"] + 14) for n in nodes_right]
    return {
        "width": width,
        "height": height,
        "box_w": box_w,
        "nodes": [*nodes_left, me, *nodes_right],
        "edges": edges,
    }


def score_bars(scores: dict[str, float], chosen: list[str]) -> list[dict[str, Any]]:
    """The routing decision as bars, best first, widths relative to the range of the scores."""
    if not scores:
        return []
    ordered = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    low = min(0.0, min(scores.values()))
    high = max(scores.values())
    span = (high - low) or 1.0
    return [
        {"slug": slug, "score": score, "pct": round(100 * (score - low) / span, 1), "chosen": slug in chosen}
        for slug, score in ordered
    ]


TRACE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def trace_grid(trace: TokenTraceOut) -> dict[str, Any]:
    """A token-level trace as a grid for the playground: one row per layer, one cell per token, coloured by
    the adapter with the largest weight there (opacity = that weight)."""
    experts = list(trace.experts)
    colour = {i: TRACE_COLOURS[i % len(TRACE_COLOURS)] for i in range(len(experts))}
    rows = []
    for name, layer in zip(trace.layers, trace.weights, strict=True):
        cells = []
        for token, weights in zip(trace.tokens, layer, strict=True):
            best = max(range(len(weights)), key=weights.__getitem__)
            cells.append(
                {
                    "colour": colour[best],
                    "opacity": round(weights[best], 2),
                    "title": f"{token!r}: {experts[best]} {weights[best]:.2f}",
                }
            )
        rows.append({"layer": name, "cells": cells})
    return {
        "tokens": trace.tokens,
        "prompt_tokens": trace.prompt_tokens,
        "legend": [{"slug": slug, "colour": colour[i]} for i, slug in enumerate(experts)],
        "rows": rows,
    }
