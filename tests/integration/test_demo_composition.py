"""The demo's `auto` composition is created through the one router fitter (composition/mixtures.py): its
embedding router's states are stored for every expert at creation, and a second call changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from api.demo import AUTO, BASE_SLUG, ensure_auto_composition
from registry import db
from registry.models import Composition, RouterState
from registry.schemas import ExpertSpec
from registry.store import ArtifactStore
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register
from tests.fixtures.tiny import build_tiny_lora


def test_auto_composition_is_fitted_when_created(registry_env: RegistryEnv, tiny_base: Path) -> None:
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug=BASE_SLUG))
    examples = {"dates-demo": "Normalize: March 3rd, 2021", "units-demo": "Convert 3 km to metres"}
    slugs = list(examples)
    for i, (slug, example) in enumerate(examples.items()):
        spec = ExpertSpec(slug=slug, base=BASE_SLUG, description=slug, example_prompts=[example])
        register(settings, build_tiny_lora(tiny_base, settings.home / slug, seed=70 + i), spec)

    async def create_twice() -> tuple[int, int]:
        engine = db.make_engine(settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                store = ArtifactStore(settings.store_dir)
                for _ in range(2):
                    await ensure_auto_composition(session, store, settings, slugs, lambda _line: None)
                comps = await session.scalar(select(func.count()).where(Composition.name == AUTO))
                states = await session.scalar(
                    select(func.count()).select_from(RouterState).where(RouterState.router == "embedding")
                )
                return int(comps or 0), int(states or 0)
        finally:
            await engine.dispose()

    comps, states = asyncio.run(create_twice())
    assert comps == 1
    assert states == len(slugs)  # one fitted state per candidate expert, none twice
