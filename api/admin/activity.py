"""The dashboard's traffic charts from the per-minute rollups (registry/metrics.py): requests and mean latency per
model over the last hour as inline SVG lines, and each composition's routing share per expert as bars. Drawn
here, server-side; the template only places the shapes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from api.admin.views import TRACE_COLOURS
from registry.models import ModelMinute, RoutingMinute

WINDOW_MIN = 60  # the charts' span, in minutes, the current one included
MAX_LINES = len(TRACE_COLOURS)  # the busiest models get a line; the table lists every model
WIDTH, HEIGHT = 480, 150  # the plot area (two charts side by side); labels sit left of it and under it
LEFT, BOTTOM, PAD = 56, 18, 6  # PAD: room above and right of the plot, so dots on its edges show whole


@dataclass
class ModelTraffic:
    """One model's hour: its totals and, per minute of the window, requests and summed latency."""

    model: str
    kind: str
    requests: list[int] = field(default_factory=lambda: [0] * WINDOW_MIN)
    latency_s: list[float] = field(default_factory=lambda: [0.0] * WINDOW_MIN)
    errors: int = 0
    colour: str = ""

    @property
    def total(self) -> int:
        return sum(self.requests)

    @property
    def mean_latency_s(self) -> float | None:
        return sum(self.latency_s) / self.total if self.total else None

    def per_minute_latency(self) -> list[float | None]:
        return [s / n if n else None for n, s in zip(self.requests, self.latency_s, strict=True)]


@dataclass
class Line:
    label: str
    colour: str
    points: str  # an SVG polyline's points
    dots: list[tuple[float, float]]  # minutes with data, drawn as dots (a lone minute shows too)


@dataclass
class Chart:
    title: str
    unit: str
    top: str  # the y-axis label at the top (the largest value drawn)
    lines: list[Line]
    width: int = LEFT + WIDTH + PAD
    height: int = PAD + HEIGHT + BOTTOM
    left: int = LEFT
    right: int = LEFT + WIDTH
    top_y: int = PAD
    bottom_y: int = PAD + HEIGHT


@dataclass
class ExpertShare:
    expert: str
    decisions: int
    pct: float


@dataclass
class RoutingShare:
    composition: str
    decisions: int
    experts: list[ExpertShare]


@dataclass
class Activity:
    models: list[ModelTraffic]  # busiest first
    requests: Chart
    latency: Chart
    routing: list[RoutingShare]
    window_min: int = WINDOW_MIN


def activity(models: Sequence[ModelMinute], routes: Sequence[RoutingMinute], now_minute: int) -> Activity:
    """The charts of the window ending at ``now_minute`` (rows outside it are ignored)."""
    first = now_minute - WINDOW_MIN + 1
    traffic: dict[tuple[str, str], ModelTraffic] = {}
    for row in models:
        i = row.minute - first
        if 0 <= i < WINDOW_MIN:
            t = traffic.setdefault((row.model, row.kind), ModelTraffic(row.model, row.kind))
            t.requests[i] += row.requests
            t.latency_s[i] += row.latency_s
            t.errors += row.errors
    busiest = sorted(traffic.values(), key=lambda t: (-t.total, t.model))
    for i, t in enumerate(busiest[:MAX_LINES]):
        t.colour = TRACE_COLOURS[i]
    drawn = busiest[:MAX_LINES]
    top_requests = max((max(t.requests) for t in drawn), default=0)
    top_latency = max((v for t in drawn for v in t.per_minute_latency() if v is not None), default=0.0)
    requests = Chart(
        "requests per minute",
        "requests",
        str(top_requests),
        [_line(t, [float(n) for n in t.requests], top_requests) for t in drawn],
    )
    latency = Chart(
        "mean latency per minute",
        "seconds",
        f"{top_latency:.3g} s",
        [_line(t, t.per_minute_latency(), top_latency) for t in drawn],
    )
    return Activity(busiest, requests, latency, _routing(routes, first))


def _line(t: ModelTraffic, values: list[float | None], top: float) -> Line:
    """A polyline through the minutes that have a value, scaled so ``top`` reaches the top of the plot."""
    step = WIDTH / (WINDOW_MIN - 1)
    scale = HEIGHT / top if top > 0 else 0.0
    bottom = PAD + HEIGHT
    xy = [(round(LEFT + i * step, 1), round(bottom - v * scale, 1)) for i, v in enumerate(values) if v is not None]
    return Line(
        f"{t.model} ({t.kind})", t.colour, " ".join(f"{x},{y}" for x, y in xy), [p for p in xy if p[1] < bottom]
    )


def _routing(routes: Sequence[RoutingMinute], first: int) -> list[RoutingShare]:
    counts: dict[str, dict[str, int]] = {}
    for row in routes:
        if row.minute >= first:
            per = counts.setdefault(row.composition, {})
            per[row.expert] = per.get(row.expert, 0) + row.decisions
    shares = []
    for composition in sorted(counts):
        per = counts[composition]
        total = sum(per.values())
        experts = [
            ExpertShare(expert, n, round(100 * n / total, 1))
            for expert, n in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        shares.append(RoutingShare(composition, total, experts))
    return shares
