"""API keys on every route but health: `query` to read and query, `admin` to write."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.deps import runtime_of
from registry.services import ApiKeyService


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.headers.get("x-api-key") or None


async def _require(connection: ASGIConnection[Any, Any, Any, Any], scope: str) -> None:
    async with runtime_of(connection.app.state).sessionmaker() as session:
        key, stamp = await ApiKeyService(session).authenticate_stamped(bearer_token(connection), need=scope)
    connection.state.api_key_id = key.id
    connection.state.api_key_scopes = list(key.scopes)
    connection.state.registry_stamp = stamp  # for the request's memo lookups (registry/epoch.py)


async def require_query(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "query")


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "admin")
