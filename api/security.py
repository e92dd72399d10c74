"""API keys on every route but health: `query` to read and query, `admin` to write.

A key may also carry an expiry, an allow-list of models and limits (registry/keys.py). Each request
authenticates with one memoized lookup: a key's grant is kept under the registry stamp (an ORM change to any
key moves it at once) and for at most ``KEY_MEMO_S`` (a write that bypassed the ORM, a raw SQL revoke say,
is seen within that). Keys with a limit are counted in the database on every request they make; the others
pay no write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.deps import runtime_of
from registry.epoch import StampedMemo
from registry.keys import ApiKeyService, KeyGrant, UsageMeter, check_scope, hash_key

KEY_MEMO_S = 1.0  # a key changed behind the ORM's back (raw SQL) is seen within this long in every process


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.headers.get("x-api-key") or None


# key hash -> the grant of a valid key, under the registry stamp and for at most KEY_MEMO_S
_KEYS = StampedMemo[KeyGrant](4096, max_age_s=KEY_MEMO_S)


@asynccontextmanager
async def key_meter_lifespan(app: Litestar) -> AsyncIterator[None]:
    """The app's usage meter (after the main lifespan made the runtime); its background writes end first."""
    meter = UsageMeter(runtime_of(app.state).sessionmaker)
    app.state.key_meter = meter
    try:
        yield
    finally:
        await meter.drain()


def meter_of(app: Litestar) -> UsageMeter:
    meter: UsageMeter | None = getattr(app.state, "key_meter", None)
    if meter is None:  # an app assembled without key_meter_lifespan
        meter = app.state.key_meter = UsageMeter(runtime_of(app.state).sessionmaker)
    return meter


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], digest: str | None, scope: str) -> KeyGrant:
    """Check the key with this hash (``None``: no key given) is live and has ``scope``, count the request if
    the key has limits (429 past one); note the grant on the connection. The JSON API's guards pass the
    Bearer key's hash, the admin panel the hash of its session's key."""
    runtime = runtime_of(connection.app.state)
    stamp = await runtime.stamps.read(runtime.sessionmaker)
    grant = _KEYS.get(stamp, digest) if digest else None
    if grant is None:
        async with runtime.sessionmaker() as session:
            key = await ApiKeyService(session).authenticate_digest(digest, need=scope)
        assert digest is not None
        grant = _KEYS.put(stamp, digest, KeyGrant.of(key))
    else:
        grant.check_live()  # expiry is exact, memo or not
        check_scope(grant.scopes, scope)
    meter = meter_of(connection.app)
    if grant.metered:
        await meter.admit(grant)
    else:
        meter.seen(grant)
    connection.state.api_key = grant
    connection.state.api_key_id = grant.id
    connection.state.api_key_scopes = list(grant.scopes)
    connection.state.registry_stamp = stamp  # the request's memo lookups use the same stamp
    return grant


def grant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> KeyGrant | None:
    found: KeyGrant | None = getattr(connection.state, "api_key", None)
    return found


def check_model(connection: ASGIConnection[Any, Any, Any, Any], model: str) -> None:
    """403 naming ``model`` when the request's key has an allow-list without it."""
    grant = grant_of(connection)
    if grant is not None:
        grant.check_model(model)


@dataclass
class TokenMeter:
    """Charges the tokens of answers to a metered key (what api/openai/serving.py calls)."""

    meter: UsageMeter
    grant: KeyGrant

    async def charge(self, tokens: int) -> None:
        await self.meter.charge(self.grant, tokens)

    def charge_later(self, tokens: int) -> None:
        self.meter.charge_later(self.grant, tokens)


def token_meter(connection: ASGIConnection[Any, Any, Any, Any]) -> TokenMeter | None:
    grant = grant_of(connection)
    if grant is None or not grant.metered:
        return None
    return TokenMeter(meter_of(connection.app), grant)


async def _require(connection: ASGIConnection[Any, Any, Any, Any], scope: str) -> None:
    secret = bearer_token(connection)
    await authorize(connection, hash_key(secret) if secret else None, scope)


async def require_query(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "query")


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "admin")


async def require_fetch(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Reading expert files (api/experts/files.py): a `fetch` key (or admin); a `query` key cannot."""
    await _require(connection, "fetch")
