"""Keys across processes: two `moerge serve` processes (torch engine) on one database, SQLite file and
PostgreSQL. They share one requests-per-minute count, and a key revoked by a raw SQL UPDATE (no ORM flush, so
no registry epoch bump) is refused by both within a second."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from registry import db
from tests.fixtures.db import _admin_exec, _postgres_admin_url, make_keys
from tests.fixtures.live import free_port


@dataclass
class Cluster:
    database_url: str
    urls: list[str]
    admin: dict[str, str]

    def new_key(self, **settings: object) -> dict[str, str]:
        resp = httpx.post(f"{self.urls[0]}/api/keys", json={"name": "shared", **settings}, headers=self.admin)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]


def _start(home: Path, database_url: str, index: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
    env.update(
        MOERGE_HOME=str(home),
        MOERGE_DATABASE_URL=database_url,
        MOERGE_ENGINE="torch",
        MOERGE_SESSION_SECRET="multiprocess-test-secret",
        MOERGE_HOST="127.0.0.1",
        MOERGE_PORT=str(port),
    )
    log = (home / f"server-{index}.log").open("wb")
    moerge = Path(sys.executable).with_name("moerge")
    proc = subprocess.Popen([str(moerge), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp(f"keys-{request.param}") / "home"
    home.mkdir()
    pg_admin = None
    if request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{home / 'moerge.db'}"
    else:
        pg_admin = _postgres_admin_url()
        name = f"moerge_t_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin_exec(pg_admin, f'CREATE DATABASE "{name}"'))
        database_url = make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    db.upgrade(database_url)

    key, _ = make_keys(database_url)
    servers = [_start(home, database_url, i) for i in range(2)]
    try:
        for i, (proc, url) in enumerate(servers):
            _wait(proc, url, home / f"server-{i}.log")
        yield Cluster(database_url, [url for _, url in servers], {"Authorization": f"Bearer {key}"})
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if pg_admin is not None:
            asyncio.run(_admin_exec(pg_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _raw_sql(database_url: str, statement: str) -> None:
    """A write straight through the database's own driver, as an operator's SQL shell would do it."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        conn = sqlite3.connect(url.database, timeout=30)
        try:
            conn.execute(statement)
            conn.commit()
        finally:
            conn.close()
        return

    async def go() -> None:
        import asyncpg

        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
        )
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def test_two_servers_share_one_requests_per_minute_limit(cluster: Cluster) -> None:
    left = 60 - time.time() % 60
    if left < 15:  # the windows are clock minutes: do not straddle one
        time.sleep(left + 0.05)
    key = cluster.new_key(rpm_limit=3)
    headers = {"Authorization": f"Bearer {key['key']}"}
    statuses = [httpx.get(f"{cluster.urls[i % 2]}/v1/models", headers=headers).status_code for i in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429]
    refused = httpx.get(f"{cluster.urls[1]}/v1/models", headers=headers)
    assert refused.json()["error"]["param"] == "rpm_limit" and 1 <= int(refused.headers["retry-after"]) <= 60


def test_a_raw_sql_revoke_is_seen_within_a_second_by_every_server(cluster: Cluster) -> None:
    key = cluster.new_key()
    headers = {"Authorization": f"Bearer {key['key']}"}
    for url in cluster.urls * 2:  # memoized in both servers now
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
    _raw_sql(cluster.database_url, f"UPDATE api_keys SET revoked = true WHERE prefix = '{key['prefix']}'")
    revoked_at = time.monotonic()
    pending = set(cluster.urls)
    while pending and time.monotonic() - revoked_at < 1.5:
        for url in list(pending):
            resp = httpx.get(f"{url}/v1/models", headers=headers)
            if resp.status_code == 401:
                assert resp.json()["error"]["param"] == "authorization"
                pending.discard(url)
        time.sleep(0.05)
    assert not pending, f"still accepted after 1.5 s by {pending}"
    # and it stays refused
    assert all(httpx.get(f"{url}/v1/models", headers=headers).status_code == 401 for url in cluster.urls)
