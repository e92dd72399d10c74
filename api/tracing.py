"""The server span of each HTTP request: Litestar's OpenTelemetry plugin (opentelemetry-instrumentation-asgi).

It continues the caller's trace (an incoming ``traceparent``), records the method, URL and response status
(an error status on a 5xx, as OpenTelemetry's HTTP conventions say; a 4xx is the client's) and makes the span
current for the handler, so the composition's spans (``resolve``, ``route``, ``generate``, ``aggregate``) are its
children. Both are installed only when a tracer provider is (``core.tracing.setup_tracing``, or a test's): with
tracing off the app has no tracing middleware at all.
"""

from __future__ import annotations

from typing import Any

from litestar.middleware import ASGIMiddleware
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ASGIApp, Receive, Scope, Send
from opentelemetry import trace
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE

from core.tracing import tracing_active

# Not traced: probes and scrapes (a load balancer's every few seconds) and the panel's static files. More can be
# left out with OTEL_PYTHON_EXCLUDED_URLS (or OTEL_PYTHON_LITESTAR_EXCLUDED_URLS), read by the instrumentation.
UNTRACED = (r"^/api/(health|ready)$", r"^/metrics$", r"^/admin/static/")


def tracing_plugins() -> list[OpenTelemetryPlugin]:
    """The server-span plugin, if a tracer provider is installed."""
    if not tracing_active():
        return []
    config = OpenTelemetryConfig(
        exclude=list(UNTRACED),
        exclude_spans=["receive", "send"],  # one span per body chunk of a stream is noise
        scope_span_details_extractor=_before_routing,
    )
    return [OpenTelemetryPlugin(config)]


def tracing_middleware() -> list[SpanRouteMiddleware]:
    """The middleware naming the server span by its route, if a tracer provider is installed."""
    return [SpanRouteMiddleware()] if tracing_active() else []


def _before_routing(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The span's name before routing: the method alone (OpenTelemetry's name when no route matches), never the
    raw path, whose values (slugs, ids, a scanner's guesses) would make every name unique."""
    return str(scope.get("method") or scope["type"]), {}


class SpanRouteMiddleware(ASGIMiddleware):
    """Names the request's server span ``METHOD route`` (``POST /api/experts/{ref}``) and sets ``http.route``
    once routing has matched one (Litestar runs app middleware per route, after routing)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        span = trace.get_current_span()
        route = scope.get("path_template")
        if route and span.is_recording():
            span.update_name(f"{scope.get('method') or scope['type']} {route}")
            span.set_attribute(HTTP_ROUTE, route)
        await next_app(scope, receive, send)
