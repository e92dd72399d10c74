"""Async engine and sessions, Alembic migrations, the refusal to run on an out-of-date database, and what a
database failure means to a caller.

A database that cannot be reached (refused, restarting, a connection lost mid-request, no pooled connection
free in time) raises :class:`core.errors.DatabaseUnavailable` (503 with ``Retry-After`` at the edge), a full disk
under it :class:`core.errors.InsufficientStorage` (507): the engine's listeners turn the driver's errors into
these where they happen (``database_error``), so a job's error, the CLI and the API all see the same meaning.
Connecting gives up after ``CONNECT_TIMEOUT_S`` and waiting for a pooled connection after ``POOL_TIMEOUT_S``,
so a request never hangs on a dead server; pooled connections are pinged before use, so a restarted server
is used again without restarting moerge.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

import registry.epoch  # noqa: F401  (registers the epoch bump on every session's flush)
from core.errors import DatabaseNotReady, DatabaseUnavailable, InsufficientStorage, MoergeError, is_out_of_space

log = logging.getLogger("moerge.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

CONNECT_TIMEOUT_S = 5  # a server that does not accept a connection in this long counts as down
POOL_TIMEOUT_S = 10  # waiting longer than this for a free pooled connection: overloaded, say so (503)
RETRY_AFTER_S = 5  # what a 503 for an unreachable database tells clients

# SQLite's primary result codes (sqlite3 gives them as ``sqlite_errorcode``; the low byte is the primary code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 5, 6, 10, 13, 14
# PostgreSQL SQLSTATEs: class 08 (connection exception), the server shutting down or starting up, too many
# connections, out of memory; and a full disk.
_PG_UNAVAILABLE_PREFIXES = ("08", "57P01", "57P02", "57P03", "53300", "53200")
_PG_DISK_FULL = "53100"


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
    else:
        connect_args = {"timeout": CONNECT_TIMEOUT_S} if url.get_driver_name() == "asyncpg" else {}
        engine = create_async_engine(url, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT_S, connect_args=connect_args)
    event.listen(engine.sync_engine, "do_connect", _connect)
    event.listen(engine.sync_engine, "handle_error", _translate)
    return engine


def database_error(exc: BaseException) -> MoergeError | None:
    """What a database failure means to a caller: ``DatabaseUnavailable`` (try again later),
    ``InsufficientStorage`` (its disk is full), or None for anything else (a bug, a constraint: the caller's
    own handling or a 500)."""
    if isinstance(exc, MoergeError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):  # the pool: every connection busy for POOL_TIMEOUT_S
        return DatabaseUnavailable(
            f"no database connection became free within {POOL_TIMEOUT_S} s (the database is overloaded); "
            "try again shortly",
            retry_after=RETRY_AFTER_S,
        )
    if isinstance(exc, sa_exc.DBAPIError):
        return _driver_error(exc.orig, disconnect=bool(exc.connection_invalidated))
    return None


def _driver_error(orig: BaseException | None, *, disconnect: bool) -> MoergeError | None:
    if orig is None:
        return None
    if is_out_of_space(orig):
        return _disk_full()
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(orig, sqlite3.Error) and isinstance(code, int):
        primary = code & 0xFF
        if primary == _SQLITE_FULL:
            return _disk_full()
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CANTOPEN):
            return DatabaseUnavailable(
                f"the database file cannot be used now ({orig}); try again shortly", retry_after=RETRY_AFTER_S
            )
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig.__cause__, "sqlstate", None)
    if sqlstate == _PG_DISK_FULL:
        return _disk_full()
    if disconnect or (isinstance(sqlstate, str) and sqlstate.startswith(_PG_UNAVAILABLE_PREFIXES)):
        return DatabaseUnavailable(
            "the connection to the database was lost (the server stopped or restarted); try again shortly",
            retry_after=RETRY_AFTER_S,
        )
    return None


def _disk_full() -> InsufficientStorage:
    return InsufficientStorage(
        "the database could not write: the disk under it is full (nothing was saved); free space and try again",
        param="database",
    )


def _translate(ctx: ExceptionContext) -> BaseException | None:
    """``handle_error``: the driver's error as a core error (raised in its place, the original as its cause);
    SQLAlchemy still invalidates a lost connection. A failed ping is left alone: the pool reconnects."""
    if ctx.is_pre_ping:
        return None
    return _driver_error(ctx.original_exception, disconnect=ctx.is_disconnect)


_last_connect_warning = 0.0


def _connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
    """``do_connect``: the dialect's own connect, with a failure to reach the server (refused, timed out, the
    server starting up or shutting down, refusing more connections) as ``DatabaseUnavailable``. Raw connect
    errors never reach ``handle_error``: this is where they get their meaning."""
    global _last_connect_warning
    try:
        return dialect.connect(*cargs, **cparams)
    except Exception as exc:
        if (found := _driver_error(exc, disconnect=False)) is not None and not isinstance(found, DatabaseUnavailable):
            raise found from exc
        now = time.monotonic()
        if now - _last_connect_warning > 5:  # an outage fails every request: say so every few seconds, not each time
            _last_connect_warning = now
            log.warning("cannot connect to the database: %s: %s", type(exc).__name__, exc)
        raise DatabaseUnavailable(
            f"the database is not accepting connections ({type(exc).__name__}); try again shortly",
            retry_after=RETRY_AFTER_S,
        ) from exc


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
