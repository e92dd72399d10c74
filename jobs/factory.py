"""The worker `moerge serve`, `moerge worker` and `moerge merge` run: a handler per kind, from settings."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.settings import Settings
from jobs.merge import MergeHandler
from jobs.worker import Worker
from registry.store import ArtifactStore


def make_worker(
    sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore, settings: Settings, *, name: str | None = None
) -> Worker:
    """Merges work in ``settings.merges_dir``; the lease lapses after ``settings.merge_stale_after_s``."""
    merge = MergeHandler(sessionmaker, store, max_lora_rank=settings.max_lora_rank)
    return Worker(sessionmaker, [(merge, settings.merges_dir)], stale_after_s=settings.merge_stale_after_s, name=name)
