"""GET /metrics: Litestar's PrometheusController (it sums the multi-process files of every moerge process on this
host, core/metrics.py), readable with an admin key or the bearer token MOERGE_METRICS_TOKEN."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.plugins.prometheus import PrometheusController

from api.deps import runtime_of
from api.security import bearer_token, require_admin


async def require_metrics(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The metrics token (compared in constant time), else an admin key: 401 without a key, 403 for a key
    without the admin scope, in the API's error shape."""
    token = runtime_of(connection.app.state).settings.metrics_token
    secret = bearer_token(connection)
    if token and secret and hmac.compare_digest(secret.encode(), token.encode()):
        return
    await require_admin(connection, handler)


class MetricsController(PrometheusController):
    path = "/metrics"
    tags = ["system"]
    guards = [require_metrics]
