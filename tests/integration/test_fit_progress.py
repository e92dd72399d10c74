"""A `fit` job's progress on a query-level router: one report per expert fitted, none for states stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import select

from composition.mixtures import fit_router
from core.settings import Settings
from registry import db
from registry.models import Expert
from registry.schemas import ExpertSpec
from registry.store import ArtifactStore
from routers.query import RouterContext
from routers.query import state as state_mod
from routers.query.embedder import LazyEmbedder
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register
from tests.fixtures.tiny import build_tiny_lora


def test_query_level_fitting_reports_each_expert(registry_env: RegistryEnv, tiny_base: Path) -> None:
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    for i, slug in enumerate(("adds", "dates")):
        spec = ExpertSpec(slug=slug, base="tiny-base", description=slug, example_prompts=[f"{slug} example"])
        register(settings, build_tiny_lora(tiny_base, settings.home / slug, seed=90 + i), spec)
    defaults = Settings.from_env()
    context = RouterContext(embedder=LazyEmbedder(defaults.embedding_model, defaults.embedding_backend))

    async def fit() -> list[tuple[int, int]]:
        reports: list[tuple[int, int]] = []
        engine = db.make_engine(settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                experts = list(await session.scalars(select(Expert).where(Expert.kind == "adapter")))
                await fit_router(
                    session,
                    ArtifactStore(settings.store_dir),
                    context,
                    "embedding",
                    {},
                    experts,
                    on_fitted=lambda done, total: reports.append((done, total)),
                )
        finally:
            await engine.dispose()
        return reports

    assert asyncio.run(fit()) == [(1, 2), (2, 2)]
    state_mod._STATES.clear()  # a fresh process: the states come from the database
    state_mod._PREPARED.clear()
    assert asyncio.run(fit()) == []  # stored: nothing fitted again
