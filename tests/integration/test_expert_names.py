"""Names unique in the database (expert_names), on SQLite and PostgreSQL: of two writes racing for one name,
each having passed the check in Python before either writes, exactly one wins and the other gets the same
409 as the check gives, leaving no row, folder or blob behind; the table, not Python, refuses an alias equal to
another expert's slug; deleting an expert frees its names; migration 0009 fills the table from existing rows
and settles names that already clash (the older expert keeps an alias; a slug always keeps its name)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from core.errors import Conflict
from registry import db
from registry.models import Expert, ExpertName
from registry.schemas import ExpertPatch, ExpertSpec
from registry.services import ExpertService
from registry.store import ArtifactStore
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.integration.test_migrations import execute

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
ROUNDS = 3

Op = Callable[[ExpertService], Awaitable[Any]]


async def race(makers: async_sessionmaker[AsyncSession], store: ArtifactStore, *ops: Op) -> list[Any]:
    """Run ``ops`` at once, each in its own session, held at its first flush until all have reached theirs:
    every op has passed its checks in Python before any of them writes (the interleaving that let two writes
    take one name when only Python checked)."""
    barrier = asyncio.Barrier(len(ops))

    async def run(op: Op) -> Any:
        async with makers() as session:
            held = False

            def hold(_session: Session, _context: Any, _instances: Any) -> None:
                nonlocal held
                if not held:
                    held = True
                    # inside the flush's greenlet: wait for the others without blocking the event loop
                    await_only(asyncio.wait_for(barrier.wait(), 60))

            event.listen(session.sync_session, "before_flush", hold)
            return await op(ExpertService(session, store))

    return await asyncio.gather(*(run(op) for op in ops), return_exceptions=True)


def one_winner(results: list[Any]) -> tuple[Any, Conflict]:
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], Conflict), results
    return won[0], lost[0]


def register(folder: Path, slug: str, aliases: list[str] | None = None) -> Op:
    async def op(service: ExpertService) -> Expert:
        return await service.register_folder(folder, ExpertSpec(slug=slug, aliases=aliases or []))

    return op


def set_aliases(ref: str, aliases: list[str]) -> Op:
    async def op(service: ExpertService) -> Expert:
        return await service.patch(ref, ExpertPatch(aliases=aliases))

    return op


async def names_of(session: AsyncSession) -> dict[str, set[str]]:
    """slug -> the names the table holds for it."""
    rows = await session.execute(select(Expert.slug, ExpertName.name).join(Expert.names))
    found: dict[str, set[str]] = {}
    for slug, name in rows:
        found.setdefault(slug, set()).add(name)
    return found


async def check_consistent(service: ExpertService, env: RegistryEnv) -> None:
    """Each expert's rows in the table are its slug and aliases; its folder exists and no other does; the
    store holds nothing half-written."""
    experts = list(await service.session.scalars(select(Expert)))
    assert await names_of(service.session) == {e.slug: {e.slug, *e.aliases} for e in experts}
    assert {p.name for p in env.store.experts.iterdir()} == {str(e.id) for e in experts}
    assert env.leftovers() == []


def with_sessions(env: RegistryEnv, scenario: Callable[[async_sessionmaker[AsyncSession]], Awaitable[None]]) -> None:
    async def go() -> None:
        engine = db.make_engine(env.settings.database_url)
        try:
            await scenario(db.make_sessionmaker(engine))
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_two_registrations_racing_for_one_alias(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def scenario(makers: async_sessionmaker[AsyncSession]) -> None:
        for i in range(ROUNDS):
            alias = f"shared-{i}"
            results = await race(
                makers,
                registry_env.store,
                register(tiny_base, f"left-{i}", [alias]),
                register(tiny_base, f"right-{i}", [alias]),
            )
            winner, lost = one_winner(results)
            assert lost.param == "aliases" and alias in str(lost), lost
            async with makers() as session:
                service = ExpertService(session, registry_env.store)
                assert (await service.get(alias)).slug == winner.slug
                assert len(list(await session.scalars(select(Expert)))) == i + 1  # the loser left no row
                await check_consistent(service, registry_env)

    with_sessions(registry_env, scenario)


def test_an_alias_racing_another_experts_slug(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def scenario(makers: async_sessionmaker[AsyncSession]) -> None:
        for i in range(ROUNDS):
            name = f"contested-{i}"
            results = await race(
                makers,
                registry_env.store,
                register(tiny_base, name),
                register(tiny_base, f"other-{i}", [name]),
            )
            winner, lost = one_winner(results)
            # the same 409 as the early check: the slug's registration is told its slug is taken, the other its alias
            assert lost.param == ("aliases" if winner.slug == name else "slug"), lost
            async with makers() as session:
                service = ExpertService(session, registry_env.store)
                assert (await service.get(name)).slug == winner.slug
                await check_consistent(service, registry_env)

    with_sessions(registry_env, scenario)


def test_the_database_refuses_an_alias_equal_to_another_slug(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def scenario(makers: async_sessionmaker[AsyncSession]) -> None:
        async with makers() as session:
            service = ExpertService(session, registry_env.store)
            first = await service.register_folder(tiny_base, ExpertSpec(slug="first"))
            second = await service.register_folder(tiny_base, ExpertSpec(slug="second", aliases=["two"]))
            with pytest.raises(Conflict) as refused:  # the early check, through the service
                await service.patch("second", ExpertPatch(aliases=["first"]))
            assert refused.value.param == "aliases"
        async with makers() as session:  # past the service, straight to the database: refused all the same
            row = await session.get(Expert, second.id)
            assert row is not None
            row.aliases = ["two", "first"]
            with pytest.raises(IntegrityError):
                await session.commit()
        async with makers() as session:  # nor may two experts share an alias
            session.add(ExpertName(name="two", expert_id=first.id, kind="alias"))
            with pytest.raises(IntegrityError):
                await session.commit()
        async with makers() as session:
            service = ExpertService(session, registry_env.store)
            assert (await service.get("first")).aliases == [] and (await service.get("two")).slug == "second"
            await check_consistent(service, registry_env)

    with_sessions(registry_env, scenario)


def test_an_update_racing_a_registration_for_one_alias(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def scenario(makers: async_sessionmaker[AsyncSession]) -> None:
        async with makers() as session:
            await ExpertService(session, registry_env.store).register_folder(
                tiny_base, ExpertSpec(slug="held", aliases=["kept"])
            )
        for i in range(ROUNDS):
            alias = f"wanted-{i}"
            results = await race(
                makers,
                registry_env.store,
                set_aliases("held", ["kept", alias]),
                register(tiny_base, f"newcomer-{i}", [alias]),
            )
            winner, lost = one_winner(results)
            assert lost.param == "aliases" and alias in str(lost), lost
            async with makers() as session:
                service = ExpertService(session, registry_env.store)
                held = await service.get("held")
                assert (await service.get(alias)).slug == winner.slug
                assert held.aliases == (["kept", alias] if winner.slug == "held" else ["kept"])
                await check_consistent(service, registry_env)
            if winner.slug == "held":  # give it back for the next round
                async with makers() as session:
                    await ExpertService(session, registry_env.store).patch("held", ExpertPatch(aliases=["kept"]))

    with_sessions(registry_env, scenario)


def test_changing_and_deleting_an_expert_frees_its_names(registry_env: RegistryEnv, tiny_base: Path) -> None:
    async def scenario(makers: async_sessionmaker[AsyncSession]) -> None:
        async with makers() as session:
            service = ExpertService(session, registry_env.store)
            gone = await service.register_folder(tiny_base, ExpertSpec(slug="gone", aliases=["g1", "g2", "gone"]))
            assert await names_of(session) == {"gone": {"gone", "g1", "g2"}}  # its own slug once
            await service.patch("gone", ExpertPatch(aliases=["g2", "g3"]))
            assert await names_of(session) == {"gone": {"gone", "g2", "g3"}}
            assert await service.find("g1") is None and (await service.find("g3")) is not None
            await service.delete("gone")
            assert list(await session.scalars(select(ExpertName).where(ExpertName.expert_id == gone.id))) == []
            fresh = await service.register_folder(tiny_base, ExpertSpec(slug="fresh", aliases=["gone", "g2"]))
            assert (await service.get("gone")).id == fresh.id and (await service.get("g2")).id == fresh.id
            await check_consistent(service, registry_env)

    with_sessions(registry_env, scenario)


# -- migration 0009 ------------------------------------------------------------------------------------------

JSON_LIST = ("aliases", "tags", "parents", "target_modules", "skills", "domains", "example_prompts", "datasets")
JSON_DICT = ("rank_pattern", "alpha_pattern", "card_metadata")
START = datetime(2026, 11, 1, tzinfo=UTC)

experts_0008 = sa.table(
    "experts",
    *(sa.column(c, sa.String()) for c in ("slug", "description", "status", "kind", "task_description")),
    *(sa.column(c, sa.String()) for c in ("manifest_sha256",)),
    *(sa.column(c, sa.JSON()) for c in (*JSON_LIST, *JSON_DICT)),
    sa.column("id", sa.Uuid()),
    sa.column("version", sa.Integer()),
    sa.column("total_size", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def expert_row(slug: str, aliases: list[str], minutes: int) -> dict[str, Any]:
    at = START + timedelta(minutes=minutes)
    return {
        **{c: [] for c in JSON_LIST},
        **{c: {} for c in JSON_DICT},
        "id": uuid.uuid4(),
        "slug": slug,
        "aliases": aliases,
        "description": "",
        "status": "active",
        "kind": "base",
        "task_description": "",
        "manifest_sha256": "0" * 64,
        "version": 1,
        "total_size": 0,
        "created_at": at,
        "updated_at": at,
    }


def test_0009_fills_the_names_and_settles_old_clashes(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    db.upgrade(database_url, "0008")
    rows = {
        "first": expert_row("first", ["late"], 0),  # an alias a later expert took as its slug: the slug keeps it
        "old": expert_row("old", ["shared", "old-alias", "old"], 1),  # its own slug as an alias too: harmless
        "new": expert_row("new", ["shared", "old", "new-alias"], 2),  # the older keeps "shared"; "old" is a slug
        "late": expert_row("late", [], 3),
    }
    execute(database_url, experts_0008.insert(), list(rows.values()))

    with caplog.at_level(logging.WARNING, logger="moerge.migrations"):
        db.upgrade(database_url)

    names = sa.table("expert_names", sa.column("name", sa.String()), sa.column("expert_id", sa.Uuid()),
                     sa.column("kind", sa.String()))  # fmt: skip
    by_id = {row["id"]: slug for slug, row in rows.items()}
    found = {(name, by_id[expert_id], kind) for name, expert_id, kind in execute(database_url, sa.select(names))}
    assert found == {
        ("first", "first", "slug"),
        ("old", "old", "slug"),
        ("shared", "old", "alias"),
        ("old-alias", "old", "alias"),
        ("new", "new", "slug"),
        ("new-alias", "new", "alias"),
        ("late", "late", "slug"),
    }
    aliases = dict(execute(database_url, sa.select(experts_0008.c.slug, experts_0008.c.aliases)))
    assert aliases == {"first": [], "old": ["shared", "old-alias", "old"], "new": ["new-alias"], "late": []}
    dropped = [r.getMessage() for r in caplog.records if r.name == "moerge.migrations"]
    assert len(dropped) == 3 and all("dropped" in m for m in dropped), dropped
    assert any("'new'" in m and "'shared'" in m for m in dropped) and any(
        "'first'" in m and "'late'" in m for m in dropped
    )

    async def lookups() -> tuple[str, str]:
        engine = db.make_engine(database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                service = ExpertService(session, ArtifactStore(Path("unused")))
                return (await service.get("shared")).slug, (await service.get("new-alias")).slug
        finally:
            await engine.dispose()

    assert asyncio.run(lookups()) == ("old", "new")
    with pytest.raises(IntegrityError):  # the table holds from now on
        execute(database_url, names.insert(), [{"name": "old-alias", "expert_id": rows["new"]["id"], "kind": "alias"}])

    command.downgrade(db.alembic_config(database_url), "0008")
    assert "expert_names" not in execute_tables(database_url)
    db.upgrade(database_url)  # and up again, from the settled lists
    assert len(execute(database_url, sa.select(names))) == 7


def execute_tables(database_url: str) -> set[str]:
    async def go() -> set[str]:
        engine = db.make_engine(database_url)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(go())
