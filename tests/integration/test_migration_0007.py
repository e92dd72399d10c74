"""Migration 0007 (key lifecycle) on a database that already holds keys, on SQLite and PostgreSQL: existing keys
keep working with no limits, no expiry and no usage counted; the usage and session tables are created (and
their foreign keys hold); the downgrade takes it all back and keeps the keys."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.exc import IntegrityError

from registry import db
from registry.keys import ApiKeyService, hash_key
from tests.fixtures.db import BACKENDS
from tests.integration.test_migrations import execute

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

SECRET = "mk-existing-key-0123456789"


def api_keys(*extra: sa.ColumnClause[Any]) -> sa.TableClause:
    """api_keys as revision 0006 left it, plus ``extra`` columns."""
    return sa.table(
        "api_keys",
        sa.column("id", sa.Uuid()),
        sa.column("name", sa.String()),
        sa.column("prefix", sa.String()),
        sa.column("key_hash", sa.String()),
        sa.column("scopes", sa.JSON()),
        sa.column("revoked", sa.Boolean()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        *extra,
    )


def tables(database_url: str) -> set[str]:
    async def go() -> set[str]:
        engine = db.make_engine(database_url)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_0007_keeps_existing_keys_working_and_downgrades(database_url: str) -> None:
    db.upgrade(database_url, "0006")
    key_id = uuid.uuid4()
    row = {"id": key_id, "name": "old", "prefix": SECRET[:10], "key_hash": hash_key(SECRET), "scopes": ["query"],
           "revoked": False, "created_at": datetime(2026, 11, 1, tzinfo=UTC)}  # fmt: skip
    execute(database_url, api_keys().insert(), [row])

    db.upgrade(database_url)

    limits = ("rpm_limit", "tpm_limit", "token_budget", "requests_total", "tokens_total")
    now = api_keys(
        *(sa.column(c, sa.BigInteger()) for c in limits),
        sa.column("models", sa.JSON()),
        sa.column("expires_at", sa.DateTime(timezone=True)),
    )
    [found] = execute(database_url, sa.select(*(now.c[c] for c in (*limits, "models", "expires_at"))))
    assert tuple(found) == (None, None, None, 0, 0, None, None)

    async def authenticate() -> str:
        engine = db.make_engine(database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                return (await ApiKeyService(session).authenticate(SECRET, need="query")).name
        finally:
            await engine.dispose()

    assert asyncio.run(authenticate()) == "old"
    assert {"key_usage", "admin_sessions"} <= tables(database_url)
    usage = sa.table("key_usage", sa.column("key_id", sa.Uuid()), sa.column("minute", sa.BigInteger()),
                     sa.column("requests", sa.BigInteger()), sa.column("tokens", sa.BigInteger()))  # fmt: skip
    execute(database_url, usage.insert(), [{"key_id": key_id, "minute": 1, "requests": 1, "tokens": 0}])
    with pytest.raises(IntegrityError):  # one row per key and minute
        execute(database_url, usage.insert(), [{"key_id": key_id, "minute": 1, "requests": 1, "tokens": 0}])
    with pytest.raises(IntegrityError):  # of a key that exists
        execute(database_url, usage.insert(), [{"key_id": uuid.uuid4(), "minute": 1, "requests": 1, "tokens": 0}])

    command.downgrade(db.alembic_config(database_url), "0006")
    assert not {"key_usage", "admin_sessions"} & tables(database_url)
    assert [tuple(r) for r in execute(database_url, sa.select(api_keys().c.name))] == [("old",)]
    db.upgrade(database_url)  # and up again
    assert asyncio.run(authenticate()) == "old"
