"""The registry epoch: bumped with every registry change, read in one query to validate memos.

Hot paths (resolving a model name, a composition's candidates and fitted router states) would otherwise
re-read the same rows on every request: 7 statements and ~5 ms to resolve one adapter here, and a
10,000-row member list per query for a large composition. They memoize what they read under the stamp
(database instance, epoch) and re-read only when it moves. Any flush that touches experts, their files or
evals, compositions or API keys bumps the epoch in its own transaction, whichever process writes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import chain
from typing import Generic, TypeVar

from sqlalchemy import event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, UOWTransaction

from registry.models import ApiKey, Composition, CompositionMember, EvalResult, Expert, ExpertFile, RegistryEpoch

WATCHED = (Expert, ExpertFile, EvalResult, Composition, CompositionMember, ApiKey)

V = TypeVar("V")


@dataclass(frozen=True)
class Stamp:
    instance: str
    value: int


@event.listens_for(Session, "after_flush")
def _bump_on_registry_change(session: Session, _context: UOWTransaction) -> None:
    # After the flush the new / dirty / deleted sets still show what was flushed; the UPDATE joins the
    # flush's transaction, so the bump commits (or rolls back) with the change itself.
    if any(isinstance(obj, WATCHED) for obj in chain(session.new, session.dirty, session.deleted)):
        session.connection().execute(
            update(RegistryEpoch).where(RegistryEpoch.id == 1).values(value=RegistryEpoch.value + 1)
        )


async def registry_stamp(session: AsyncSession) -> Stamp | None:
    """The current stamp; None when the table has no row (nothing is then memoized)."""
    row = (
        await session.execute(select(RegistryEpoch.instance, RegistryEpoch.value).where(RegistryEpoch.id == 1))
    ).first()
    return None if row is None else Stamp(str(row[0]), int(row[1]))


class StampedMemo(Generic[V]):
    """An LRU of values read from the registry, each valid only under the stamp it was read at and, with
    ``max_age_s``, for at most that long (a write that bypassed the ORM, e.g. a raw SQL UPDATE, moves no
    stamp: the age bounds how long it can go unseen)."""

    def __init__(self, size: int, *, max_age_s: float | None = None) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self._items: OrderedDict[tuple[str, Hashable], tuple[int, float, V]] = OrderedDict()

    def get(self, stamp: Stamp | None, key: Hashable) -> V | None:
        if stamp is None:
            return None
        found = self._items.get((stamp.instance, key))
        if found is None or found[0] != stamp.value:
            return None
        if self.max_age_s is not None and time.monotonic() - found[1] >= self.max_age_s:
            return None
        self._items.move_to_end((stamp.instance, key))
        return found[2]

    def put(self, stamp: Stamp | None, key: Hashable, value: V) -> V:
        if stamp is not None:
            self._items[(stamp.instance, key)] = (stamp.value, time.monotonic(), value)
            self._items.move_to_end((stamp.instance, key))
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


class StampReader:
    """Reads the stamp for a request's memo lookups. On SQLite it reads the one row through a plain
    sqlite3 connection in the calling thread (~20 us; WAL readers never wait on writers) instead of an
    async session, whose thread hops and ORM bookkeeping were most of an API request's own cost here.
    Other databases go through the async session."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        database = url.database if url.get_backend_name() == "sqlite" else None
        self._sqlite_path = database if database and database != ":memory:" else None
        self._local = threading.local()

    async def read(self, sessionmaker: async_sessionmaker[AsyncSession]) -> Stamp | None:
        if self._sqlite_path is None:
            async with sessionmaker() as session:
                return await registry_stamp(session)
        return self._read_sqlite(self._sqlite_path)

    def _read_sqlite(self, path: str) -> Stamp | None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)  # autocommit: each read sees the latest
            self._local.conn = conn
        try:
            row = conn.execute("SELECT instance, value FROM registry_epoch WHERE id = 1").fetchone()
        except sqlite3.OperationalError:  # no such table (a database made without the migrations)
            return None
        return None if row is None else Stamp(str(row[0]), int(row[1]))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
