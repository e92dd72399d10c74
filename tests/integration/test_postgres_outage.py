"""PostgreSQL stopped and started again under load, with moerge served by uvicorn (torch engine, a tiny model).

Eight clients read and write for about 20 s (list experts, /v1/models, create a composition, a short chat
completion) while a PostgreSQL server of the test's own (port 54349, its own data folder: the shared test
server is left alone) is stopped with `pg_ctl stop -m fast` for a few seconds and started again. While it is
down every request gets a 503 with ``Retry-After`` and the code ``database_unavailable`` (never a 500, never
a hang: the client's timeout is never reached) and /api/ready says ``database unreachable``; once it is back,
every request succeeds without restarting moerge, and every composition acknowledged with a 201 is in the
database.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from core.settings import Settings
from registry import db
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import _postgres_admin_url, make_keys, postgres_database
from tests.fixtures.live import register, serve

pytestmark = pytest.mark.postgres

PORT = 54349  # not the shared test server's 54329: stopping this one disturbs no other test
DATA = Path(f"/tmp/moerge-pg-{PORT}")  # scripts/postgres.sh's default data folder for this port
ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8
RUN_S = 20.0
DOWN_AT_S, DOWN_FOR_S = 6.0, 4.0
CLIENT_TIMEOUT_S = 15.0  # a request waiting this long counts as a hang


def _start_server() -> str:
    """Start (or reuse) the test's own server with the project's script; its admin URL."""
    env = {**os.environ, "MOERGE_PG_PORT": str(PORT), "MOERGE_PG_DATA": str(DATA)}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/postgres.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _pg_ctl(*args: str) -> None:
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3].split(".")[0]))
    command = [str(bins[-1]), "-D", str(DATA), "-w", *args]
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root (as in scripts/postgres.sh)
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@pytest.fixture
def outage_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    _postgres_admin_url()  # skipped without PostgreSQL locally, a failure under CI, like every PostgreSQL test
    admin = _start_server()
    monkeypatch.setenv("MOERGE_TEST_POSTGRES_URL", admin)  # postgres_database makes its database there
    try:
        with postgres_database("moerge_outage") as url:
            yield url
    finally:
        _pg_ctl("stop", "-m", "fast")  # this server is the test's own


@dataclass
class Outcome:
    op: str
    started: float
    seconds: float
    status: int | None  # None: no answer within CLIENT_TIMEOUT_S, or the connection failed
    retry_after: str | None = None
    code: str | None = None
    created: str | None = None  # a composition acknowledged with 201


def _client_loop(
    url: str, admin: dict[str, str], index: int, stop: threading.Event, out: list[Outcome], t0: float
) -> None:
    chat = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=url, headers=admin, timeout=CLIENT_TIMEOUT_S) as http:
        ops: list[tuple[str, Callable[[int], httpx.Response]]] = [
            ("list experts", lambda n: http.get("/api/experts")),
            ("models", lambda n: http.get("/v1/models")),
            (
                "create composition",
                lambda n: http.post(
                    "/api/compositions", json={"name": f"c-{index}-{n}", "router": "direct", "experts": ["tiny-base"]}
                ),
            ),
            ("chat", lambda n: http.post("/v1/chat/completions", json=chat)),
        ]
        n = 0
        while not stop.is_set():
            op, call = ops[(index + n) % len(ops)]
            started = time.monotonic()
            try:
                resp = call(n)
            except httpx.HTTPError:
                out.append(Outcome(op, started - t0, time.monotonic() - started, None))
            else:
                code = resp.json().get("error", {}).get("code") if resp.status_code >= 400 else None
                created = resp.json()["name"] if op == "create composition" and resp.status_code == 201 else None
                out.append(
                    Outcome(
                        op,
                        started - t0,
                        time.monotonic() - started,
                        resp.status_code,
                        resp.headers.get("retry-after"),
                        code,
                        created,
                    )
                )
            n += 1


async def _composition_names(url: str) -> set[str]:
    u = make_url(url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        return {row["name"] for row in await conn.fetch("SELECT name FROM compositions")}
    finally:
        await conn.close()


def test_postgres_stopped_and_started_under_load(outage_url: str, tiny_base: Path, tmp_path: Path) -> None:
    db.upgrade(outage_url)
    admin_key, _ = make_keys(outage_url)
    settings = Settings(home=tmp_path / "home", database_url=outage_url, import_roots=())
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    admin = {"Authorization": f"Bearer {admin_key}"}

    with serve(settings, TorchEngine()) as url:
        outcomes: list[Outcome] = []
        stop = threading.Event()
        t0 = time.monotonic()
        clients = [
            threading.Thread(target=_client_loop, args=(url, admin, i, stop, outcomes, t0), daemon=True)
            for i in range(CLIENTS)
        ]
        for thread in clients:
            thread.start()
        ready: list[tuple[float, int, str]] = []  # (seconds since start, status, what /api/ready said)

        def probe() -> None:
            resp = httpx.get(f"{url}/api/ready", timeout=CLIENT_TIMEOUT_S)
            ready.append((time.monotonic() - t0, resp.status_code, resp.json()["status"]))

        time.sleep(DOWN_AT_S)
        stopping_at = time.monotonic() - t0  # PostgreSQL refuses from here: `pg_ctl stop` may take a while
        _pg_ctl("stop", "-m", "fast")
        down_at = time.monotonic() - t0
        while time.monotonic() - t0 < down_at + DOWN_FOR_S:
            probe()
            time.sleep(0.5)
        _start_server()
        back_at = time.monotonic() - t0
        while True:  # the first ready answer after the restart: from here on, everything must succeed
            probe()
            if ready[-1][1] == 200:
                break
            assert time.monotonic() - t0 < back_at + 10, ready[-1]
            time.sleep(0.2)
        recovered_at = ready[-1][0]
        time.sleep(max(0.0, RUN_S - (time.monotonic() - t0)))
        stop.set()
        for thread in clients:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)

        by_status = collections.Counter((o.op, o.status) for o in outcomes)
        print(
            f"\n{len(outcomes)} requests; stopping at {stopping_at:.1f} s, down {down_at:.1f}-{back_at:.1f} s, "
            f"ready again at {recovered_at:.1f} s"
        )
        for (op, status), count in sorted(by_status.items(), key=str):
            print(f"  {op}: {status} x{count}")
        print(f"  slowest answer: {max(o.seconds for o in outcomes):.2f} s")

        assert all(o.status is not None for o in outcomes), "a request got no answer within the client's timeout"
        assert {o.status for o in outcomes} <= {200, 201, 503}, by_status
        refused = [o for o in outcomes if o.status == 503]
        assert refused, "the outage reached no request"
        assert all(o.retry_after is not None and int(o.retry_after) > 0 for o in refused)
        assert {o.code for o in refused} == {"database_unavailable"}, {o.code for o in refused}
        outside = [(o.op, round(o.started, 2)) for o in refused if not stopping_at - 1 <= o.started <= recovered_at]
        assert not outside, f"503s outside the outage ({stopping_at:.2f}-{recovered_at:.2f} s): {outside[:5]}"
        assert any(status == 503 and text == "database unreachable" for _, status, text in ready), ready

        after = [o for o in outcomes if o.started > recovered_at]
        assert {o.op for o in after if o.status in (200, 201)} == {
            "list experts",
            "models",
            "create composition",
            "chat",
        }
        assert all(o.status in (200, 201) for o in after), [o for o in after if o.status not in (200, 201)]

    acknowledged = {o.created for o in outcomes if o.created is not None}
    stored = asyncio.run(_composition_names(outage_url))
    assert acknowledged <= stored, f"acknowledged but lost: {sorted(acknowledged - stored)}"
