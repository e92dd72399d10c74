"""Counts every HTTP request by route template, model kind and status, and times it to the end of its response
(a stream's last event); a request that named a model is added to this process's per-minute rollups too.

Litestar's ``PrometheusMiddleware`` computes its labels before the handler runs, and the model kind is known
only once /v1 has resolved the model: the handler notes it on the request's :class:`RequestFacts`, read here
after the response."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import REQUEST_SECONDS, REQUESTS
from registry.metrics import Rollups

FACTS = "moerge_metrics"  # the key of a request's RequestFacts in its scope's state


@dataclass
class RequestFacts:
    """What a handler learns about its request that its metrics are labelled by."""

    started: float  # time.perf_counter() when the request arrived
    kind: str = ""  # the model's kind (base, adapter, merged, finetune, composition), "" when it names none
    model: str = ""  # the expert's slug or the composition's name that answers


def facts_of(connection: ASGIConnection[Any, Any, Any, Any]) -> RequestFacts | None:
    """The request's facts (None in an app assembled without MetricsMiddleware)."""
    found = connection.scope.get("state", {}).get(FACTS)
    return found if isinstance(found, RequestFacts) else None


def rollups_of(app: Any) -> Rollups | None:
    """The app's per-minute rollups (api/metrics/lifespan.py), None before its lifespan made them."""
    found = getattr(app.state, "rollups", None)
    return found if isinstance(found, Rollups) else None


class MetricsMiddleware:
    """The app's outermost middleware (a draining replica's refusals count too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        facts = RequestFacts(time.perf_counter())
        scope.setdefault("state", {})[FACTS] = facts
        status = 500  # an exception that escapes every handler: the server answers 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - facts.started
            route = scope.get("path_template") or ""
            REQUESTS.labels(route=route, kind=facts.kind, status=str(status)).inc()
            REQUEST_SECONDS.labels(route=route, kind=facts.kind).observe(seconds)
            rollups = rollups_of(scope["litestar_app"]) if facts.model else None
            if rollups is not None:
                rollups.request(facts.model, facts.kind, error=status >= 400, seconds=seconds)
