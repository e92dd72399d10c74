"""Registration copies and hashes files in a worker thread, so the server's event loop keeps answering while a
large model is ingested; a registration cancelled mid-copy (client gone, server shutting down) leaves no blob,
no folder and no row behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

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


async def test_ingest_runs_while_the_event_loop_keeps_going(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'moerge.db'}"
    await asyncio.to_thread(db.upgrade, url)
    store = ArtifactStore(tmp_path / "store")
    store.ensure()
    held = _HeldIngest(store.ingest_folder)
    monkeypatch.setattr(store, "ingest_folder", held)
    engine = db.make_engine(url)
    try:
        async with db.make_sessionmaker(engine)() as session:
            registration = asyncio.create_task(
                ExpertService(session, store).register_folder(tiny_base, ExpertSpec(slug="tiny"))
            )
            await _wait_for(held.started)  # the copy is under way, and this coroutine still runs
            held.release.set()
            expert = await registration
        assert held.released_in_time
        assert held.thread_id is not None and held.thread_id != threading.get_ident()
        assert expert.slug == "tiny" and (store.expert_dir(expert.id) / "config.json").exists()
    finally:
        await engine.dispose()


async def test_cancelled_mid_copy_leaves_nothing(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
            registration = asyncio.create_task(
                ExpertService(session, store).register_folder(tiny_base, ExpertSpec(slug="tiny"))
            )
            await _wait_for(held.started)
            registration.cancel()
            await asyncio.sleep(0.05)
            assert not registration.done()  # it waits for the copy it cannot stop ...
            held.release.set()
            with pytest.raises(asyncio.CancelledError):
                await registration
        assert held.released_in_time
        assert store.blob_count() == 0  # ... and removes what the copy added
        assert not any(store.experts.iterdir()) and store.leftovers() == []
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(Expert)) == 0
    finally:
        await engine.dispose()
