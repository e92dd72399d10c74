"""The registry epoch (registry/epoch.py): every registry change bumps it in its own transaction, derived
rows do not, and memos keyed on it never serve a dropped and recreated database's values."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from registry import db
from registry.epoch import Stamp, StampedMemo, StampReader, registry_stamp
from registry.models import ApiKey, EvalResult, Expert, Job, RouterState
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import serve


async def _scenario(url: str) -> list[int]:
    await asyncio.to_thread(db.upgrade, url)
    engine = db.make_engine(url)
    values: list[int] = []
    try:
        sessions = db.make_sessionmaker(engine)

        async def now() -> int:
            async with sessions() as s:
                stamp = await registry_stamp(s)
                assert stamp is not None
                return stamp.value

        values.append(await now())
        async with sessions() as s:  # a new expert
            expert = Expert(id=uuid.uuid4(), slug="e1", kind="base", manifest_sha256="0" * 64)
            s.add(expert)
            await s.commit()
        values.append(await now())
        async with sessions() as s:  # a derived row (router state) and a merge job's progress: no bump
            s.add(RouterState(router="embedding", config_hash="x", expert_id=expert.id, fingerprint="f", payload=b""))
            s.add(Job(id=uuid.uuid4(), method="ties", params={}, status="queued"))
            await s.commit()
        values.append(await now())
        async with sessions() as s:  # an edit, then an eval result
            row = await s.get(Expert, expert.id)
            assert row is not None
            row.description = "changed"
            await s.commit()
            s.add(EvalResult(expert_id=expert.id, task="t", metric="exact_match", value=1.0))
            await s.commit()
        values.append(await now())
        async with sessions() as s:  # rolled back: no bump survives
            s.add(ApiKey(name="k", prefix="mk_", key_hash="h" * 64, scopes=["query"]))
            await s.flush()
            await s.rollback()
        values.append(await now())
    finally:
        await engine.dispose()
    return values


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_registry_changes_bump_the_epoch_and_derived_rows_do_not(database_url: str) -> None:
    start, added, derived, edited, rolled_back = asyncio.run(_scenario(database_url))
    assert added == start + 1
    assert derived == added
    assert edited == derived + 2  # two commits, one bump each
    assert rolled_back == edited


def test_stamped_memo_is_valid_only_under_its_stamp() -> None:
    memo = StampedMemo[str](2)
    first = Stamp("db-a", 3)
    memo.put(first, "auto", "comp-v3")
    assert memo.get(first, "auto") == "comp-v3"
    assert memo.get(Stamp("db-a", 4), "auto") is None  # the registry moved on
    assert memo.get(Stamp("db-b", 3), "auto") is None  # another (or a recreated) database, same epoch
    assert memo.get(None, "auto") is None and memo.put(None, "x", "v") == "v" and memo.get(None, "x") is None
    memo.put(first, "b", "1")
    memo.put(first, "c", "2")  # size 2: the least recently used entry goes
    assert memo.get(first, "auto") is None and memo.get(first, "c") == "2"


async def _reader_scenario(url: str) -> tuple[Stamp | None, Stamp | None, Stamp | None]:
    await asyncio.to_thread(db.upgrade, url)
    engine = db.make_engine(url)
    reader = StampReader(url)
    try:
        sessions = db.make_sessionmaker(engine)
        first = await reader.read(sessions)
        async with sessions() as s:  # a write through another connection, as another process would
            s.add(Expert(id=uuid.uuid4(), slug="e2", kind="base", manifest_sha256="0" * 64))
            await s.commit()
        second = await reader.read(sessions)
        async with sessions() as s:
            exact = await registry_stamp(s)
    finally:
        reader.close()
        await engine.dispose()
    return first, second, exact


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_stamp_reader_sees_every_commit_at_once(database_url: str) -> None:
    first, second, exact = asyncio.run(_reader_scenario(database_url))
    assert first is not None and second is not None
    assert second == exact and second.value == first.value + 1 and second.instance == first.instance


async def _revoke(url: str, secret: str) -> None:
    from sqlalchemy import select

    from registry.services import hash_key

    engine = db.make_engine(url)
    try:
        async with db.make_sessionmaker(engine)() as s:  # as another process (the CLI) would
            key = await s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
            assert key is not None
            key.revoked = True
            await s.commit()
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_a_key_revoked_elsewhere_is_refused_on_the_next_request(registry_env: RegistryEnv) -> None:
    """Valid keys are memoized under the registry stamp: a change written by another process must end
    the memo at once, not after some expiry."""
    with serve(registry_env.settings, TorchEngine()) as url:
        assert httpx.get(f"{url}/v1/models", headers=registry_env.query).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=registry_env.query).status_code == 200  # memoized now
        asyncio.run(_revoke(registry_env.settings.database_url, registry_env.query_key))
        refused = httpx.get(f"{url}/v1/models", headers=registry_env.query)
        assert refused.status_code == 401 and refused.json()["error"]["param"] == "authorization"
        assert httpx.get(f"{url}/v1/models", headers=registry_env.admin).status_code == 200
