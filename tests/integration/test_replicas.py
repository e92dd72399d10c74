"""Replicas on one PostgreSQL database and one store: two `moerge serve --no-worker` processes (torch engine, no
vLLM children) and two `moerge worker` processes, all real subprocesses.

Six merge jobs submitted alternately through both replicas each run exactly once, by one of the workers; a
composition created on one replica answers on the other at once; an admin session started on one replica is
valid on the other (one session secret); a worker SIGKILLed mid-merge leaves the job failed once its lease
lapses (a merge gets one attempt), with nothing registered and no output left; SIGTERM drains a replica: the
requests in flight (a stream and a plain one) finish, new ones and /api/ready get 503, and it exits 0."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import bench.load
from core.settings import Settings
from registry import db
from registry.schemas import ExpertSpec
from tests.fixtures.db import make_keys, postgres_database
from tests.fixtures.live import free_port, register
from tests.fixtures.merges import SMOL_TIES
from tests.fixtures.merges import TIES as TINY_TIES
from tests.fixtures.tiny import build_tiny_finetune

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TERMINAL = {"succeeded", "failed", "cancelled"}
STALE_S = 4  # a worker's lease lapses this long after its last heartbeat
DRAIN_S = 60  # the replicas' bound on the requests in flight at SIGTERM


class Proc(bench.load.Proc):
    """One `moerge serve` or `moerge worker` child process (bench/load.py's), with the port a replica serves on."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, port: int = 0) -> None:
        super().__init__(name, args, env, log)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    replicas: list[Proc]
    workers: list[Proc]
    settings: Settings
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def api(self, replica: Proc, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{replica.url}{path}", headers=self.headers, timeout=120, **kwargs)

    def job(self, replica: Proc, job_id: str) -> dict[str, Any]:
        resp = self.api(replica, "GET", f"/api/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def wait_job(
        self, replica: Proc, job_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 120
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not done(job := self.job(replica, job_id)):
            assert job["status"] not in TERMINAL, job
            assert time.monotonic() < deadline, (job, self.tails())
            time.sleep(0.1)
        return job

    def worker_of(self, job: dict[str, Any]) -> Proc:
        """The worker process named by a job's owner (``host:pid:random``)."""
        pid = int(str(job["owner"]).split(":")[-2])
        (worker,) = [w for w in self.workers if w.pid == pid]
        return worker

    def outputs(self) -> list[str]:
        merges = self.settings.merges_dir
        return sorted(p.name for p in merges.iterdir()) if merges.exists() else []

    def tails(self) -> str:
        return "\n".join(p.log_tail() for p in [*self.replicas, *self.workers])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this module's processes."""
    with postgres_database("moerge_r") as url:
        yield url


def _admin_key(settings: Settings) -> str:
    return make_keys(settings.database_url)[0]


def _wait_started(cluster: Cluster) -> None:
    deadline = time.monotonic() + 180
    pending = [*cluster.replicas, *cluster.workers]
    while pending:
        for proc in list(pending):
            assert proc.alive(), cluster.tails()
            if proc in cluster.workers:
                started = "runs" in proc.log.read_text(errors="replace")  # it printed "worker <name>: runs ..."
            else:
                try:
                    started = httpx.get(f"{proc.url}/api/ready", timeout=2).status_code == 200
                except httpx.HTTPError:
                    started = False
            if started:
                pending.remove(proc)
        assert time.monotonic() < deadline, cluster.tails()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(
    postgres_url: str, tiny_base: Path, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    from bench.merge_inputs import make_finetunes
    from registry.convert import cache_dir

    root = tmp_path_factory.mktemp("replicas")
    home = root / "home"  # one home: one store and one merges folder for every process
    settings = Settings(home=home, database_url=postgres_url, import_roots=(home,))
    db.upgrade(postgres_url)
    key = _admin_key(settings)
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    for slug, seed in (("ft-a", 1), ("ft-b", 2)):
        register(
            settings, build_tiny_finetune(tiny_base, root / slug, seed=seed), ExpertSpec(slug=slug, base="tiny-base")
        )
    register(settings, smollm2_dir, ExpertSpec(slug="smollm2"))
    for i, folder in enumerate(make_finetunes(smollm2_dir, cache_dir() / "merge-bench", n=2)):  # cached per machine
        register(settings, folder, ExpertSpec(slug=f"smol-ft{i}", base="smollm2"))

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_") or k == "MOERGE_CACHE"}
    env.update(
        MOERGE_HOME=str(home),
        MOERGE_DATABASE_URL=postgres_url,
        MOERGE_ENGINE="torch",  # no vLLM children
        MOERGE_MERGE_STALE_S=str(STALE_S),
        MOERGE_DRAIN_S=str(DRAIN_S),
        MOERGE_SESSION_SECRET=f"shared-{uuid.uuid4().hex}",  # replicas on other machines would share it the same way
        MOERGE_HOST="127.0.0.1",
    )
    replicas = []
    for name in ("replica-a", "replica-b"):
        port = free_port()
        replica_env = {**env, "MOERGE_PORT": str(port)}
        replicas.append(Proc(name, ["serve", "--no-worker"], replica_env, root / f"{name}.log", port=port))
    workers = [Proc(name, ["worker"], env, root / f"{name}.log") for name in ("worker-1", "worker-2")]
    cluster = Cluster(replicas, workers, settings, key)
    try:
        for proc in [*replicas, *workers]:
            proc.start()
        _wait_started(cluster)
        yield cluster
    finally:
        for proc in [*replicas, *workers]:
            proc.stop()


def test_six_merges_through_both_replicas_each_run_once(cluster: Cluster) -> None:
    ids = []
    for i in range(6):
        submitted = cluster.api(cluster.replicas[i % 2], "POST", "/api/merges", json={**TINY_TIES, "name": f"ties-{i}"})
        assert submitted.status_code == 201, submitted.text
        ids.append(submitted.json()["id"])
    # each read back through the other replica
    finals = [
        cluster.wait_job(cluster.replicas[(i + 1) % 2], job_id, lambda j: j["status"] in TERMINAL, timeout_s=90)
        for i, job_id in enumerate(ids)
    ]
    for final in finals:
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        cluster.worker_of(final)  # owned by one of the two workers (not a replica: they run none)
    results = {final["result_expert"]["id"] for final in finals}
    assert {final["result_expert"]["slug"] for final in finals} == {f"ties-{i}" for i in range(6)}

    merged = cluster.api(cluster.replicas[0], "GET", "/api/experts", params={"kind": "merged"}).json()
    assert merged["total"] == 6 and {e["id"] for e in merged["data"]} == results  # nothing registered twice
    assert sorted(e["lineage"]["merge_job_id"] for e in merged["data"]) == sorted(ids)
    assert cluster.outputs() == []


def test_a_composition_made_on_one_replica_answers_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.replicas
    created = cluster.api(
        a, "POST", "/api/compositions", json={"name": "combo", "router": "direct", "experts": ["ties-0"]}
    )
    assert created.status_code == 201, created.text
    body = {"model": "combo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    answer = cluster.api(b, "POST", "/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "combo" and answer.headers["x-moerge-experts"] == "ties-0"


def test_an_admin_session_from_one_replica_is_valid_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.replicas
    with httpx.Client(base_url=a.url, timeout=30) as client:
        form = client.get("/admin/login").text
        token = re.search(r'name="_csrf_token" value="([^"]+)"', form)
        assert token is not None, form[:500]
        signed_in = client.post(
            "/admin/login", data={"key": cluster.key, "_csrf_token": token.group(1), "next": "/admin/"}
        )
        assert signed_in.status_code == 303, signed_in.text
        cookie = client.cookies.get("moerge_admin")
    assert cookie
    assert httpx.get(f"{b.url}/admin/", follow_redirects=False).status_code == 303  # no session: to the sign-in
    page = httpx.get(f"{b.url}/admin/", cookies={"moerge_admin": cookie}, follow_redirects=False, timeout=30)
    assert page.status_code == 200 and "Dashboard" in page.text, page.text[:500]


def test_a_worker_killed_mid_merge_leaves_the_job_failed_and_nothing_registered(cluster: Cluster) -> None:
    a, b = cluster.replicas
    submitted = cluster.api(b, "POST", "/api/merges", json={**SMOL_TIES, "name": "smol-killed"})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    running = cluster.wait_job(a, job_id, lambda j: j["status"] == "running" and j["progress"] > 0.05 and j["owner"])
    victim = cluster.worker_of(running)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=30)
    assert any(".partial-" in name for name in cluster.outputs()), cluster.outputs()  # its half-written output

    # the other worker settles it once the lease lapses: a merge gets one attempt, so it fails
    final = cluster.wait_job(a, job_id, lambda j: j["status"] in TERMINAL, timeout_s=STALE_S + 60)
    assert final["status"] == "failed" and "worker running this job died" in final["error"], final
    assert final["result_expert"] is None and final["attempts"] == 1
    assert cluster.api(b, "GET", "/api/experts/smol-killed").status_code == 404
    deadline = time.monotonic() + 10
    while cluster.outputs() and time.monotonic() < deadline:  # removed in the same settling pass
        time.sleep(0.1)
    assert cluster.outputs() == []


def _chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def test_sigterm_drains_a_replica(cluster: Cluster) -> None:
    """Run last: it stops replica A."""
    a, b = cluster.replicas
    assert a.proc is not None
    warm = cluster.api(a, "POST", "/v1/chat/completions", json=_chat(1))  # loads SmolLM2 in this replica
    assert warm.status_code == 200, warm.text
    tokens = 48

    plain: dict[str, Any] = {}

    def ask_plain() -> None:
        try:
            plain["resp"] = cluster.api(a, "POST", "/v1/chat/completions", json=_chat(tokens))
        except httpx.HTTPError as exc:  # reported by the assertion below
            plain["error"] = exc

    thread = threading.Thread(target=ask_plain)
    chunks: list[str] = []
    with httpx.stream(
        "POST", f"{a.url}/v1/chat/completions", headers=cluster.headers, json=_chat(tokens, stream=True), timeout=120
    ) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for line in lines:  # until the first token: the stream is in flight
            if line.startswith("data: ") and '"content"' in line:
                chunks.append(line)
                break
        # The plain request queues behind the stream's batch (the torch engine batches what has arrived when
        # a batch starts): in flight until both have decoded.
        thread.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 10
        while (ready := httpx.get(f"{a.url}/api/ready", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        refused = cluster.api(a, "POST", "/v1/chat/completions", json=_chat(4))
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{a.url}/api/health", timeout=10).status_code == 200  # probes still answer
        assert thread.is_alive() and a.alive()  # still in flight: the checks above ran during the drain

        chunks += [line for line in lines if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]", chunks[-3:]
    assert '"finish_reason":"length"' in "".join(chunks).replace(" ", "")
    thread.join(timeout=120)
    assert "error" not in plain, plain
    assert plain["resp"].status_code == 200, plain["resp"].text
    assert plain["resp"].json()["usage"]["completion_tokens"] == tokens

    assert a.proc.wait(timeout=DRAIN_S + 30) == 0, a.log_tail()
    assert time.monotonic() - signalled < DRAIN_S, a.log_tail()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{a.url}/api/ready", timeout=5)
    ready_b = httpx.get(f"{b.url}/api/ready", timeout=10)  # the other replica takes the traffic
    assert ready_b.status_code == 200 and ready_b.json() == {"status": "ready"}
