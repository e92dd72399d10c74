"""Registration copies and hashes files in a worker thread, so the server's event loop keeps answering while a
large model is ingested; a registration cancelled mid-copy (client gone, server shutting down) leaves no blob,
no folder and no row behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry import db
from registry.models import Expert
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from registry.store import ArtifactStore, IngestResult


class _HeldIngest:
    """Wraps ArtifactStore.ingest_folder: records the thread it runs on and waits for ``release`` before
    copying (up to a timeout, so a copy that blocked the event loop fails the test instead of hanging it)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.started = threading.Event()
        self.release = threading.Event()
        self.thread_id: int | None = None
        self.released_in_time = False

    def __call__(self, folder: Path, relpaths: Iterable[str]) -> IngestResult:
        self.thread_id = threading.get_ident()
        self.started.set()
        self.released_in_time = self.release.wait(timeout=20)
        result: IngestResult = self.original(folder, relpaths)
        return result


async def _wait_for(event: threading.Event) -> None:
    for _ in range(2000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the ingest never started")


@dataclass
class _Registration:
    task: asyncio.Task[Expert]  # register_folder, now inside its held copy
    ingest: _HeldIngest
    store: ArtifactStore
    sessions: async_sessionmaker[AsyncSession]


@asynccontextmanager
async def _registration_in_its_copy(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[_Registration]:
    """A registration of ``folder`` into a fresh SQLite registry, started and waiting inside its file copy."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'moerge.db'}"
    await asyncio.to_thread(db.upgrade, url)
    store = ArtifactStore(tmp_path / "store")
    store.ensure()
    held = _HeldIngest(store.ingest_folder)
    monkeypatch.setattr(store, "ingest_folder", held)
    engine = db.make_engine(url)
    try:
        sessions = db.make_sessionmaker(engine)
        async with sessions() as session:
            task = asyncio.create_task(ExpertService(session, store).register_folder(folder, ExpertSpec(slug="tiny")))
            await _wait_for(held.started)  # the copy is under way, and this coroutine still runs
            yield _Registration(task, held, store, sessions)
    finally:
        await engine.dispose()


async def test_ingest_runs_while_the_event_loop_keeps_going(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _registration_in_its_copy(tmp_path, tiny_base, monkeypatch) as reg:
        reg.ingest.release.set()
        expert = await reg.task
    assert reg.ingest.released_in_time
    assert reg.ingest.thread_id is not None and reg.ingest.thread_id != threading.get_ident()
    assert expert.slug == "tiny" and (reg.store.expert_dir(expert.id) / "config.json").exists()


async def test_cancelled_mid_copy_leaves_nothing(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _registration_in_its_copy(tmp_path, tiny_base, monkeypatch) as reg:
        reg.task.cancel()
        await asyncio.sleep(0.05)
        assert not reg.task.done()  # it waits for the copy it cannot stop ...
        reg.ingest.release.set()
        with pytest.raises(asyncio.CancelledError):
            await reg.task
        assert reg.ingest.released_in_time
        assert reg.store.blob_count() == 0  # ... and removes what the copy added
        assert not any(reg.store.experts.iterdir()) and reg.store.leftovers() == []
        async with reg.sessions() as session:
            assert await session.scalar(select(func.count()).select_from(Expert)) == 0
