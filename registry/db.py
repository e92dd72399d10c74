"""Async engine and sessions, Alembic migrations, and the refusal to run on an out-of-date database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

import registry.epoch  # noqa: F401  (registers the epoch bump on every session's flush)
from core.errors import DatabaseNotReady

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _enable_sqlite_foreign_keys(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # SQLite ignores FOREIGN KEY clauses unless asked per connection; RESTRICT guards depend on it.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets readers (routing, listing) run while a registration writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _prepare_sqlite_dir(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(database_url: str) -> AsyncEngine:
    url = make_url(database_url)
    _prepare_sqlite_dir(database_url)
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
        return engine
    return create_async_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%': escape it so URLs with encoded passwords survive.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Run the migrations (blocking; the migrations' env.py drives its own event loop)."""
    _prepare_sqlite_dir(database_url)
    command.upgrade(alembic_config(database_url), revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    def _read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_read)


async def ensure_migrated(engine: AsyncEngine) -> None:
    """Refuse an unmigrated or out-of-date database, naming the command that fixes it."""
    head = head_revision()
    current = await current_revision(engine)
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        state = "not migrated" if current is None else f"at revision {current}, code expects {head}"
        raise DatabaseNotReady(f"database {where} is {state}: run `moerge db upgrade`", param="database")
