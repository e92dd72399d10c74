"""Migrations on a database that already holds rows, on SQLite and PostgreSQL (the startup tests migrate empty
ones): 0006 gives existing merge jobs their result name and builds the unique index over pending jobs; 0008 makes
the merge jobs the one jobs table."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from registry import db
from tests.fixtures.db import BACKENDS

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


def merge_jobs(*extra: sa.ColumnClause[Any]) -> sa.TableClause:
    """merge_jobs as revision 0005 left it (the columns these rows need), typed so each backend binds its own
    way, plus ``extra`` columns."""
    return sa.table(
        "merge_jobs",
        sa.column("id", sa.Uuid()),
        sa.column("status", sa.String()),
        sa.column("method", sa.String()),
        sa.column("params", sa.JSON()),
        sa.column("progress", sa.Float()),
        sa.column("message", sa.Text()),
        sa.column("cancel_requested", sa.Boolean()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
        *extra,
    )


START = datetime(2026, 11, 1, tzinfo=UTC)


def job(status: str, name: str | None, minutes: int) -> dict[str, Any]:
    at = START + timedelta(minutes=minutes)
    params = {"method": "ties", "config": {"name": name} if name else {}}
    return {"id": uuid.uuid4(), "status": status, "method": "ties", "params": params, "progress": 0.0,
            "message": "", "cancel_requested": False, "created_at": at, "updated_at": at}  # fmt: skip


def execute(database_url: str, statement: sa.Executable, rows: list[dict[str, Any]] | None = None) -> list[Any]:
    async def go() -> list[Any]:
        engine = db.make_engine(database_url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(statement, rows)
                return list(result) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_0006_backfills_result_names_and_keeps_one_pending_job_per_name(database_url: str) -> None:
    db.upgrade(database_url, "0005")
    jobs = {
        "older-queued": job("queued", "shared", 0),
        "newer-running": job("running", "shared", 1),  # the race the index closes: the newer loses the name
        "done": job("succeeded", "shared", 2),  # finished jobs are outside the index and keep theirs
        "other": job("queued", "other", 3),
        "unnamed": job("failed", None, 4),
    }
    execute(database_url, merge_jobs().insert(), list(jobs.values()))

    db.upgrade(database_url, "0007")  # (0008 renames the table: see the test below)

    jobs_now = merge_jobs(sa.column("result_name", sa.String()))
    rows = execute(database_url, sa.select(jobs_now.c.id, jobs_now.c.result_name))
    assert dict(rows) == {
        jobs["older-queued"]["id"]: "shared",
        jobs["newer-running"]["id"]: None,
        jobs["done"]["id"]: "shared",
        jobs["other"]["id"]: "other",
        jobs["unnamed"]["id"]: None,
    }
    # The index is in place: another pending job cannot take a pending job's name; a finished one can.
    with pytest.raises(IntegrityError):
        execute(database_url, jobs_now.insert(), [{**job("queued", "other", 5), "result_name": "other"}])
    execute(database_url, jobs_now.insert(), [{**job("succeeded", "other", 6), "result_name": "other"}])


def test_0008_keeps_merge_jobs_as_jobs_of_kind_merge(database_url: str) -> None:
    db.upgrade(database_url, "0007")
    queued = {**job("queued", "merged-one", 0), "result_name": "merged-one"}
    execute(database_url, merge_jobs(sa.column("result_name", sa.String())).insert(), [queued])

    db.upgrade(database_url)

    jobs = merge_jobs(sa.column("result_name", sa.String()), sa.column("kind", sa.String()),
                      sa.column("attempts", sa.Integer()))  # fmt: skip
    jobs.name = "jobs"
    assert execute(database_url, sa.select(jobs.c.id, jobs.c.kind, jobs.c.attempts)) == [(queued["id"], "merge", 0)]
    # the pending-name index came along under its new name, across kinds
    with pytest.raises(IntegrityError):
        execute(database_url, jobs.insert(), [{**job("queued", "x", 1), "result_name": "merged-one", "kind": "train"}])

    from alembic import command

    command.downgrade(db.alembic_config(database_url), "0007")  # and back: merges only, under the old names
    assert execute(database_url, sa.select(merge_jobs().c.id)) == [(queued["id"],)]
