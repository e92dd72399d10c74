"""The demo serves first: its preparation registers the real SmolLM2 base and every expert the recipe already
trained on this machine, and queues a `train` job (recipe `demo-lora`) for each other one, once however often
it runs; each expert registered later joins `auto` (made with the first) through ``sync_auto``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from api.demo import AUTO, BASE_SLUG, expert_slug, prepare_demo, sync_auto
from evals.tasks import TASKS
from registry import db
from registry.models import Job
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from registry.store import ArtifactStore
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register
from tests.fixtures.tiny import build_tiny_lora

pytestmark = pytest.mark.slow


def _train_jobs(settings: object) -> list[Job]:
    async def read() -> list[Job]:
        engine = db.make_engine(settings.database_url)  # type: ignore[attr-defined]
        try:
            async with db.make_sessionmaker(engine)() as session:
                return list(await session.scalars(select(Job).where(Job.kind == "train")))
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_prepare_queues_each_missing_expert_once(registry_env: RegistryEnv, smollm2_dir: Path) -> None:
    settings = registry_env.settings
    lines: list[str] = []
    state = asyncio.run(prepare_demo(settings, lines.append))
    assert len(state.experts) + len(state.training) == len(TASKS)
    jobs = _train_jobs(settings)
    assert sorted(j.result_name or "" for j in jobs) == sorted(state.training)
    for job in jobs:
        assert job.method == "demo-lora" and job.status == "queued"
        assert job.params["config"]["params"]["task"] in {t.name for t in TASKS}
        assert job.params["expert"]["slug"] == job.result_name and job.params["expert"]["example_prompts"]
    assert any(line.startswith(f"base {BASE_SLUG}") for line in lines)

    again = asyncio.run(prepare_demo(settings, lines.append))  # a second run queues nothing twice
    assert again.training == state.training and len(_train_jobs(settings)) == len(jobs)


def test_each_registered_expert_joins_auto(registry_env: RegistryEnv, tiny_base: Path) -> None:
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug=BASE_SLUG))
    first, second = (expert_slug(t.name) for t in list(TASKS)[:2])
    assert asyncio.run(sync_auto(settings, lambda _line: None)) == []  # nothing trained yet: no `auto`
    for i, slug in enumerate((first, second)):
        spec = ExpertSpec(slug=slug, base=BASE_SLUG, description=slug, example_prompts=[f"example {i}"])
        register(settings, build_tiny_lora(tiny_base, settings.home / slug, seed=80 + i), spec)
        assert asyncio.run(sync_auto(settings, lambda _line: None)) == [slug]

    async def members() -> list[str]:
        from composition.service import CompositionService

        engine = db.make_engine(settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                service = CompositionService(session, ArtifactStore(settings.store_dir))
                comp = await service.get(AUTO)
                assert comp.fallback_id is not None
                base = await ExpertService(session, ArtifactStore(settings.store_dir)).get(BASE_SLUG)
                assert comp.fallback_id == base.id
                return list((await service.describe(comp))["experts"])  # in declared order
        finally:
            await engine.dispose()

    assert asyncio.run(members()) == [first, second]
    assert asyncio.run(sync_auto(settings, lambda _line: None)) == []  # up to date: no change
