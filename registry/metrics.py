"""Per-minute rollups for the admin dashboard: requests, errors and latency per model, and each composition's
routing decisions per expert, kept in the database so every replica's traffic shows in one chart.

The request path only adds to dictionaries in memory (:meth:`Rollups.request`, :meth:`Rollups.route`); each
process writes its counts about once a minute and at shutdown (:meth:`Rollups.flush`) with one upsert that
adds to the rows already there (``INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n``, on SQLite and
PostgreSQL alike), so replicas writing the same minute sum up instead of overwriting each other. Each flush also
deletes the rows older than ``keep_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.periodic import Periodic
from registry.models import ModelMinute, RoutingMinute

log = logging.getLogger("moerge.metrics")

ROWS_PER_STATEMENT = 500  # bound parameters stay well under SQLite's limit whatever a backlog holds

ModelKey = tuple[int, str, str]  # (minute, model, kind)
RouteKey = tuple[int, str, str]  # (minute, composition, expert)


def minute_of(now: float | None = None) -> int:
    """The clock minute of ``now`` (Unix time // 60), as rows name it."""
    return int((time.time() if now is None else now) // 60)


@dataclass
class ModelCounts:
    requests: int = 0
    errors: int = 0
    latency_s: float = 0.0

    def add(self, other: ModelCounts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.latency_s += other.latency_s


class Rollups:
    """One process's counts not yet written, and the writing of them (``run`` every ``flush_s``)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *, keep_s: float) -> None:
        self.sessionmaker = sessionmaker
        self.keep_s = keep_s
        self._models: dict[ModelKey, ModelCounts] = {}
        self._routes: dict[RouteKey, int] = {}

    # -- the request path: memory only ------------------------------------------------------------------
    def request(self, model: str, kind: str, *, error: bool, seconds: float, now: float | None = None) -> None:
        counts = self._models.setdefault((minute_of(now), model, kind), ModelCounts())
        counts.add(ModelCounts(1, int(error), seconds))

    def route(self, composition: str, expert: str, now: float | None = None) -> None:
        key = (minute_of(now), composition, expert)
        self._routes[key] = self._routes.get(key, 0) + 1

    @property
    def pending(self) -> bool:
        return bool(self._models or self._routes)

    # -- writing ----------------------------------------------------------------------------------------
    async def flush(self, now: float | None = None) -> None:
        """Add what was counted since the last flush to the database and delete rows older than ``keep_s``.
        If the database cannot take it, the counts are kept for the next flush (those older than ``keep_s``
        are dropped then) and the error is raised."""
        models, self._models = self._models, {}
        routes, self._routes = self._routes, {}
        oldest = minute_of(now) - int(self.keep_s // 60)
        try:
            async with self.sessionmaker() as session, session.begin():
                await _add_models(session, models)
                await _add_routes(session, routes)
                await session.execute(delete(ModelMinute).where(ModelMinute.minute < oldest))
                await session.execute(delete(RoutingMinute).where(RoutingMinute.minute < oldest))
        except BaseException:
            for key, counts in models.items():
                if key[0] >= oldest:
                    self._models.setdefault(key, ModelCounts()).add(counts)
            for key, n in routes.items():
                if key[0] >= oldest:
                    self._routes[key] = self._routes.get(key, 0) + n
            raise

    async def flush_or_log(self) -> None:
        """One periodic flush; a failure is logged and retried at the next."""
        try:
            await self.flush()
        except Exception as exc:
            log.warning("could not write the per-minute request counts (kept for the next try): %r", exc)

    def writer(self, every_s: float) -> Periodic:
        """Flush every ``every_s`` in the background (``start`` it; ``stop`` it at shutdown, then ``close``)."""
        return Periodic(self.flush_or_log, every_s, name="moerge-metrics-rollups")

    async def close(self) -> None:
        """The last flush, at shutdown: a failure is logged (the counts of this process are then lost)."""
        try:
            await self.flush()
        except Exception as exc:
            log.warning("could not write the last per-minute request counts: %r", exc)


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [rows[i : i + ROWS_PER_STATEMENT] for i in range(0, len(rows), ROWS_PER_STATEMENT)]


async def _add_models(session: AsyncSession, counts: dict[ModelKey, ModelCounts]) -> None:
    rows = [
        {
            "minute": m,
            "model": model,
            "kind": kind,
            "requests": c.requests,
            "errors": c.errors,
            "latency_s": c.latency_s,
        }
        for (m, model, kind), c in sorted(counts.items())
    ]
    await _add(session, ModelMinute.__table__, rows, keys=("minute", "model", "kind"))


async def _add_routes(session: AsyncSession, counts: dict[RouteKey, int]) -> None:
    rows = [
        {"minute": m, "composition": comp, "expert": expert, "decisions": n}
        for (m, comp, expert), n in sorted(counts.items())
    ]
    await _add(session, RoutingMinute.__table__, rows, keys=("minute", "composition", "expert"))


async def _add(session: AsyncSession, table: Any, rows: list[dict[str, Any]], *, keys: tuple[str, ...]) -> None:
    """Insert ``rows``, adding their counts (every column but ``keys``) to a row already there (another process's
    counts of the same minute). Rows come sorted: two replicas upserting the same rows take their locks in one
    order (no deadlock on PostgreSQL)."""
    for chunk in _chunks(rows):
        stmt = _insert(session)(table).values(chunk)
        summed = {name: table.c[name] + stmt.excluded[name] for name in chunk[0] if name not in keys}
        await session.execute(stmt.on_conflict_do_update(index_elements=[table.c[k] for k in keys], set_=summed))


async def recent_minutes(session: AsyncSession, since: int) -> tuple[Sequence[ModelMinute], Sequence[RoutingMinute]]:
    """The rows from minute ``since`` on, oldest first."""
    models = (
        await session.scalars(
            select(ModelMinute).where(ModelMinute.minute >= since).order_by(ModelMinute.minute, ModelMinute.model)
        )
    ).all()
    routes = (
        await session.scalars(
            select(RoutingMinute)
            .where(RoutingMinute.minute >= since)
            .order_by(RoutingMinute.composition, RoutingMinute.expert)
        )
    ).all()
    return models, routes
