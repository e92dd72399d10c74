"""API keys on every route but health: `query` to read and query, `admin` to write."""

from __future__ import annotations

import uuid
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.deps import runtime_of
from registry.epoch import StampedMemo
from registry.services import ApiKeyService, check_scope, hash_key


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.headers.get("x-api-key") or None


# key hash -> (key id, scopes) of valid keys, under the registry stamp: a revoked or changed key bumps it
_KEYS = StampedMemo[tuple[uuid.UUID, tuple[str, ...]]](1024)


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], digest: str | None, scope: str) -> None:
    """Check the key with this hash (``None``: no key given) has ``scope``; note the key on the connection.
    The JSON API's guards pass the Bearer key's hash, the admin panel the hash its session keeps."""
    runtime = runtime_of(connection.app.state)
    stamp = await runtime.stamps.read(runtime.sessionmaker)
    found = _KEYS.get(stamp, digest) if digest else None
    if found is None:
        async with runtime.sessionmaker() as session:
            key = await ApiKeyService(session).authenticate_digest(digest, need=scope)
        assert digest is not None
        found = _KEYS.put(stamp, digest, (key.id, tuple(str(s) for s in key.scopes)))
    else:
        check_scope(found[1], scope)
    connection.state.api_key_id, scopes = found
    connection.state.api_key_scopes = list(scopes)
    connection.state.registry_stamp = stamp  # the request's memo lookups use the same stamp


async def _require(connection: ASGIConnection[Any, Any, Any, Any], scope: str) -> None:
    secret = bearer_token(connection)
    await authorize(connection, hash_key(secret) if secret else None, scope)


async def require_query(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "query")


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "admin")
