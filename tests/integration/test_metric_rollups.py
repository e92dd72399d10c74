"""The per-minute rollups behind the dashboard's charts (registry/metrics.py), on SQLite and PostgreSQL: two
writers (two replicas, each with its own engine and pool) flushing the same minutes add up, at once too; old rows
are deleted as rows are written; counts a failed flush could not write are kept for the next."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry import db
from registry.metrics import Rollups, minute_of, recent_minutes
from registry.models import ModelMinute, RoutingMinute
from tests.fixtures.db import BACKENDS

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

NOW = 1_800_000_000.0  # a fixed clock: minute 30_000_000
KEEP_S = 3600.0


@pytest.fixture
async def makers(database_url: str) -> AsyncIterator[list[async_sessionmaker[AsyncSession]]]:
    """Two sessionmakers on two engines: what two replicas hold."""
    await asyncio.to_thread(db.upgrade, database_url)
    engines = [db.make_engine(database_url) for _ in range(2)]
    try:
        yield [db.make_sessionmaker(engine) for engine in engines]
    finally:
        for engine in engines:
            await engine.dispose()


async def _rows(
    maker: async_sessionmaker[AsyncSession],
) -> tuple[dict[tuple[int, str, str], tuple[int, int, float]], dict[tuple[int, str, str], int]]:
    async with maker() as session:
        models = {
            (r.minute, r.model, r.kind): (r.requests, r.errors, round(r.latency_s, 6))
            for r in await session.scalars(select(ModelMinute))
        }
        routes = {
            (r.minute, r.composition, r.expert): r.decisions for r in await session.scalars(select(RoutingMinute))
        }
    return models, routes


async def test_two_writers_add_to_the_same_minutes(makers: list[async_sessionmaker[AsyncSession]]) -> None:
    a, b = (Rollups(maker, keep_s=KEEP_S) for maker in makers)
    m = minute_of(NOW)
    for _ in range(3):
        a.request("lora-a", "adapter", error=False, seconds=0.5, now=NOW)
    a.request("lora-a", "adapter", error=True, seconds=0.25, now=NOW)
    a.route("comp", "lora-a", now=NOW)
    b.request("lora-a", "adapter", error=False, seconds=1.0, now=NOW)
    b.request("comp", "composition", error=False, seconds=2.0, now=NOW + 60)  # the next minute
    b.route("comp", "lora-a", now=NOW)
    b.route("comp", "lora-b", now=NOW)
    await a.flush(now=NOW)
    await b.flush(now=NOW + 60)
    models, routes = await _rows(makers[0])
    assert models == {(m, "lora-a", "adapter"): (5, 1, 2.75), (m + 1, "comp", "composition"): (1, 0, 2.0)}
    assert routes == {(m, "comp", "lora-a"): 2, (m, "comp", "lora-b"): 1}
    assert not a.pending and not b.pending

    # flushing again adds, never overwrites; both at once too
    for _ in range(10):
        a.request("lora-a", "adapter", error=False, seconds=0.1, now=NOW)
        b.request("lora-a", "adapter", error=False, seconds=0.1, now=NOW)
        a.route("comp", "lora-a", now=NOW)
        b.route("comp", "lora-a", now=NOW)
    await asyncio.gather(a.flush(now=NOW + 60), b.flush(now=NOW + 60))
    models, routes = await _rows(makers[1])
    assert models[(m, "lora-a", "adapter")] == (25, 1, 4.75)
    assert routes[(m, "comp", "lora-a")] == 22

    # the dashboard's read: from a minute on
    async with makers[0]() as session:
        later, later_routes = await recent_minutes(session, m + 1)
    assert [(r.model, r.requests) for r in later] == [("comp", 1)] and not later_routes


async def test_rows_past_the_bound_are_deleted_when_writing(makers: list[async_sessionmaker[AsyncSession]]) -> None:
    rollups = Rollups(makers[0], keep_s=KEEP_S)
    old = NOW - KEEP_S - 120
    rollups.request("lora-a", "adapter", error=False, seconds=1.0, now=old)
    rollups.route("comp", "lora-a", now=old)
    await rollups.flush(now=old)
    rollups.request("lora-a", "adapter", error=False, seconds=1.0, now=NOW)
    await rollups.flush(now=NOW)
    models, routes = await _rows(makers[0])
    assert list(models) == [(minute_of(NOW), "lora-a", "adapter")] and routes == {}


async def test_a_failed_flush_keeps_its_counts_for_the_next(
    makers: list[async_sessionmaker[AsyncSession]], tmp_path: Path
) -> None:
    nowhere = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'no-such-folder' / 'x.db'}")  # cannot be opened
    rollups = Rollups(db.make_sessionmaker(nowhere), keep_s=KEEP_S)
    rollups.request("lora-a", "adapter", error=False, seconds=1.0, now=NOW)
    rollups.route("comp", "lora-a", now=NOW)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for a file it cannot open
            await rollups.flush(now=NOW)
    finally:
        await nowhere.dispose()
    assert rollups.pending
    rollups.request("lora-a", "adapter", error=True, seconds=1.0, now=NOW)
    rollups.sessionmaker = makers[0]  # the database is back
    await rollups.flush(now=NOW)
    models, routes = await _rows(makers[0])
    assert models == {(minute_of(NOW), "lora-a", "adapter"): (2, 1, 2.0)}
    assert routes == {(minute_of(NOW), "comp", "lora-a"): 1}
