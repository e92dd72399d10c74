"""The content-addressed store under races (SQLite and PostgreSQL, each scenario run 20 times): two identical
registrations at once, and a deletion racing a registration that reuses the deleted expert's blobs. Afterwards
every expert verifies clean (each blob whole, each folder complete), the store holds nothing half-written, and
an expert's folder holds hard links, never symlinks. A blob removed by hand is reported by verify and stored
again when the same bytes are registered again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.errors import Conflict
from registry import db
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from tests.fixtures.db import BACKENDS, RegistryEnv

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
ROUNDS = 20


async def _clean(service: ExpertService) -> None:
    report = await service.verify()
    assert all(not damage for damage in report.values()), report
    for slug in report:
        folder = service.store.expert_dir((await service.get(slug)).id)
        assert not [p for p in folder.rglob("*") if p.is_symlink()], slug


def test_identical_registrations_at_once(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def rounds() -> None:
        engine = db.make_engine(registry_env.settings.database_url)
        makers = db.make_sessionmaker(engine)
        try:
            for i in range(ROUNDS):

                async def register(slug: str = f"twin-{i}") -> str:
                    async with makers() as session:
                        expert = await ExpertService(session, registry_env.store).register_folder(
                            tiny_base, ExpertSpec(slug=slug)
                        )
                        return expert.slug

                results = await asyncio.gather(register(), register(), return_exceptions=True)
                won = [r for r in results if isinstance(r, str)]
                lost = [r for r in results if isinstance(r, BaseException)]
                assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], Conflict), results
                async with makers() as session:
                    await _clean(ExpertService(session, registry_env.store))
                assert registry_env.leftovers() == []
        finally:
            await engine.dispose()

    asyncio.run(rounds())


def test_deletion_racing_a_registration_of_the_same_bytes(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def rounds() -> None:
        engine = db.make_engine(registry_env.settings.database_url)
        makers = db.make_sessionmaker(engine)
        try:
            async with makers() as session:
                await ExpertService(session, registry_env.store).register_folder(tiny_base, ExpertSpec(slug="gen-0"))
            for i in range(1, ROUNDS + 1):

                async def delete_old(slug: str = f"gen-{i - 1}") -> None:
                    async with makers() as session:
                        await ExpertService(session, registry_env.store).delete(slug)

                async def register_new(slug: str = f"gen-{i}") -> None:
                    async with makers() as session:
                        await ExpertService(session, registry_env.store).register_folder(
                            tiny_base, ExpertSpec(slug=slug)
                        )

                await asyncio.gather(delete_old(), register_new())
                async with makers() as session:
                    service = ExpertService(session, registry_env.store)
                    assert list(await service.verify()) == [f"gen-{i}"]
                    await _clean(service)
        finally:
            await engine.dispose()

    asyncio.run(rounds())


def test_a_missing_blob_is_reported_and_restored_by_the_same_bytes(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def scenario() -> None:
        engine = db.make_engine(registry_env.settings.database_url)
        makers = db.make_sessionmaker(engine)
        try:
            async with makers() as session:
                service = ExpertService(session, registry_env.store)
                expert = await service.register_folder(tiny_base, ExpertSpec(slug="first"))
                lost = next(f for f in expert.files if f.path == "config.json")
                registry_env.store.blob_path(lost.sha256).unlink()  # gone from the store by hand
                damage = (await service.verify())["first"]
                assert [(d.path, d.problem) for d in damage] == [("config.json", "missing")]
                # the expert's folder still answers (its own link to the bytes)
                assert (registry_env.store.expert_dir(expert.id) / "config.json").exists()
                await service.register_folder(tiny_base, ExpertSpec(slug="second"))  # the same bytes again
                await _clean(service)
        finally:
            await engine.dispose()

    asyncio.run(scenario())
