"""The app refuses to start on an unmigrated or out-of-date database, naming the command to run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlalchemy import text

from api.app import create_app
from core.errors import DatabaseNotReady
from core.settings import Settings
from registry import db
from registry.services import ApiKeyService
from tests.fixtures.db import BACKENDS

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


def settings_for(database_url: str, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, import_roots=(tmp_path,))


def startup_errors(settings: Settings) -> list[BaseException]:
    """Start the app; return the errors its startup raised (anyio wraps them in exception groups)."""
    try:
        with TestClient(app=create_app(settings)):
            return []
    except BaseException as exc:
        found: list[BaseException] = []
        stack = [exc]
        while stack:
            current = stack.pop()
            if isinstance(current, BaseExceptionGroup):
                stack.extend(current.exceptions)
            else:
                found.append(current)
        return found


def test_unmigrated_database_refused(database_url: str, tmp_path: Path) -> None:
    (error,) = startup_errors(settings_for(database_url, tmp_path))
    assert isinstance(error, DatabaseNotReady)
    assert "not migrated: run `moerge db upgrade`" in str(error)


def test_out_of_date_database_refused(database_url: str, tmp_path: Path) -> None:
    db.upgrade(database_url)

    async def rewind() -> None:
        engine = db.make_engine(database_url)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'old0'"))
        await engine.dispose()

    asyncio.run(rewind())
    (error,) = startup_errors(settings_for(database_url, tmp_path))
    assert isinstance(error, DatabaseNotReady)
    assert "at revision old0, code expects" in str(error) and "moerge db upgrade" in str(error)


def test_migrated_database_starts(database_url: str, tmp_path: Path) -> None:
    db.upgrade(database_url)

    async def admin_key() -> str:
        engine = db.make_engine(database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                return (await ApiKeyService(session).create("admin", ["admin"]))[1]
        finally:
            await engine.dispose()

    headers = {"authorization": f"Bearer {asyncio.run(admin_key())}"}  # the revision is in the admin view
    with TestClient(app=create_app(settings_for(database_url, tmp_path))) as client:
        assert client.get("/api/health", headers=headers).json()["checks"]["database"]["revision"] == db.head_revision()
