"""Merge jobs on the real SmolLM2-135M (a TIES merge takes seconds here, long enough to watch, cancel and
kill) run by `moerge serve` as a subprocess (SQLite, torch engine): the progress stream climbs to 100% and
the merged model answers at once; a cancelled job leaves no expert and no output; a worker killed with
SIGKILL mid-merge leaves a job that the restarted server marks failed, with its partial output removed and
nothing registered; a server stopped cleanly mid-merge re-queues the job and runs it again on its next start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from core.settings import Settings
from registry import db
from registry.schemas import ExpertSpec
from tests.fixtures.db import make_keys
from tests.fixtures.live import free_port, register
from tests.fixtures.merges import SMOL_TIES as TIES

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}


class Server:
    """`moerge serve` in a child process, on the torch engine, with a short stale-heartbeat limit."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
        env.update(
            MOERGE_HOME=str(self.home),
            MOERGE_ENGINE="torch",
            MOERGE_MERGE_STALE_S="3",
            MOERGE_STORE_ORPHAN_AGE_S="0",  # no other process writes this store: sweep at once
            MOERGE_HOST="127.0.0.1",
            MOERGE_PORT=str(port),
        )
        self.starts += 1
        log = (self.home / f"server-{self.starts}.log").open("wb")
        moerge = Path(sys.executable).with_name("moerge")
        self.proc = subprocess.Popen([str(moerge), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        return (self.home / f"server-{self.starts}.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def live(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from bench.merge_inputs import make_finetunes
    from registry.convert import cache_dir

    home = tmp_path_factory.mktemp("merge-worker") / "home"
    settings = Settings(home=home, database_url=f"sqlite+aiosqlite:///{home / 'moerge.db'}", import_roots=(home,))
    db.upgrade(settings.database_url)

    key = make_keys(settings.database_url)[0]
    finetunes = make_finetunes(smollm2_dir, cache_dir() / "merge-bench", n=2)  # cached per machine
    register(settings, smollm2_dir, ExpertSpec(slug="smollm2"))
    for i, folder in enumerate(finetunes):
        register(settings, folder, ExpertSpec(slug=f"smol-ft{i}", base="smollm2"))
    server = Server(home)
    server.start()
    try:
        yield {"server": server, "settings": settings, "headers": {"Authorization": f"Bearer {key}"}}
    finally:
        server.stop()


def api(live: dict[str, Any], method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{live['server'].url}{path}", headers=live["headers"], timeout=120, **kwargs)


def job_state(live: dict[str, Any], job_id: str) -> dict[str, Any]:
    resp = api(live, "GET", f"/api/merges/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def wait_for(live: dict[str, Any], job_id: str, done: Any, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not done(job := job_state(live, job_id)):
        assert job["status"] not in TERMINAL or done(job), job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def outputs(live: dict[str, Any]) -> list[str]:
    merges = live["settings"].merges_dir
    return sorted(p.name for p in merges.iterdir()) if merges.exists() else []


def no_expert(live: dict[str, Any], name: str) -> None:
    assert api(live, "GET", f"/api/experts/{name}").status_code == 404
    assert live["settings"].store_dir.joinpath("tmp").exists()
    assert not list(live["settings"].store_dir.joinpath("tmp").iterdir())


def test_progress_stream_to_done_and_query_at_once(live: dict[str, Any]) -> None:
    job = api(live, "POST", "/api/merges", json={**TIES, "name": "smol-ties"}).json()
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", f"{live['server'].url}/api/merges/{job['id']}/events", headers=live["headers"], timeout=120
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and len(set(progress)) >= 4, progress
    assert any(e["status"] == "running" and 0 < e["progress"] < 1 for e in events)
    last = events[-1]
    assert last["status"] == "succeeded" and last["progress"] == 1.0 and last["result_expert"]["slug"] == "smol-ties"
    assert outputs(live) == []

    body = {"model": "smol-ties", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    answer = api(live, "POST", "/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "smol-ties"


def test_cancel_a_running_merge(live: dict[str, Any]) -> None:
    job = api(live, "POST", "/api/merges", json={**TIES, "name": "smol-cancelled"}).json()
    wait_for(live, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0.05)
    resp = api(live, "POST", f"/api/merges/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["cancel_requested"] is True, resp.text
    final = wait_for(live, job["id"], lambda j: j["status"] in TERMINAL, timeout_s=60)
    assert final["status"] == "cancelled" and final["result_expert"] is None and final["progress"] < 0.95
    no_expert(live, "smol-cancelled")
    assert outputs(live) == []
    assert api(live, "POST", f"/api/merges/{job['id']}/cancel").status_code == 409


def stored_job(live: dict[str, Any], job_id: str) -> tuple[str, str]:
    """(status, message) read from the database itself, while no server runs."""
    from sqlalchemy import select

    from registry.models import Job

    async def read() -> tuple[str, str]:
        engine = db.make_engine(live["settings"].database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                row = (await session.execute(select(Job.status, Job.message).where(Job.id == UUID(job_id)))).one()
                return str(row[0]), str(row[1])
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_stopped_server_requeues_and_killed_worker_fails(live: dict[str, Any]) -> None:
    server: Server = live["server"]
    job = api(live, "POST", "/api/merges", json={**TIES, "name": "smol-killed"}).json()
    wait_for(live, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0.05)
    server.stop()  # a clean shutdown puts the job back in the queue
    assert stored_job(live, job["id"]) == ("queued", "re-queued: the server stopped during the merge")
    assert outputs(live) == []

    server.start()  # ... and the next start runs it again
    wait_for(live, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0.05)
    server.kill()
    assert any(".partial-" in name for name in outputs(live))  # the dead worker's half-written output
    server.start()
    final = wait_for(live, job["id"], lambda j: j["status"] in TERMINAL, timeout_s=60)
    assert final["status"] == "failed" and "worker running this job died" in final["error"], final
    assert final["result_expert"] is None
    no_expert(live, "smol-killed")
    assert outputs(live) == []


def store_leftovers(live: dict[str, Any]) -> list[str]:
    """What in the store no database row accounts for: temporary files, expert folders without a row, blobs
    no expert refers to (read while no server runs)."""
    from sqlalchemy import select

    from registry.models import Expert, ExpertFile

    async def read() -> tuple[set[str], set[str]]:
        engine = db.make_engine(live["settings"].database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                ids = {str(i) for i in await session.scalars(select(Expert.id))}
                return ids, set(await session.scalars(select(ExpertFile.sha256)))
        finally:
            await engine.dispose()

    ids, shas = asyncio.run(read())
    store = live["settings"].store_dir
    found = [f"tmp/{p.name}" for p in (store / "tmp").iterdir()]
    found += [f"experts/{p.name}" for p in (store / "experts").iterdir() if p.name not in ids]
    found += [f"blobs/{p.name}" for p in (store / "blobs").glob("*/*") if p.name not in shas]
    return found


def test_worker_killed_while_registering_leaves_no_half_registered_expert(live: dict[str, Any]) -> None:
    """SIGKILL while the result is being stored (blobs copied, folder built, row not yet committed): on the
    next start the job has ended one way or the other, whole, and the store holds nothing no row accounts for."""
    server: Server = live["server"]
    job = api(live, "POST", "/api/merges", json={**TIES, "name": "smol-killed-registering"}).json()
    seen = wait_for(
        live, job["id"], lambda j: j["message"] == "registering the merged model" or j["status"] in TERMINAL
    )
    server.kill()
    assert seen["status"] == "running", seen  # killed mid-registration, not after
    server.stop()  # (already dead) so the store is read with no server running
    server.start()
    final = wait_for(live, job["id"], lambda j: j["status"] in TERMINAL, timeout_s=60)
    server.stop()
    try:
        assert store_leftovers(live) == []
    finally:
        server.start()
    if final["status"] == "succeeded":  # the commit landed before the kill: recovered, and whole
        assert final["result_expert"]["slug"] == "smol-killed-registering"
        verify = api(live, "GET", "/api/experts/smol-killed-registering")
        assert verify.status_code == 200 and verify.json()["kind"] == "merged"
    else:
        assert final["status"] == "failed" and final["result_expert"] is None, final
        no_expert(live, "smol-killed-registering")
