"""/api/ready and the drain, in process (tests/integration/test_replicas.py sends real SIGTERMs): ready once
started; draining refuses new requests in the OpenAI error shape while the probes still answer; a database
that does not answer makes the replica not ready; the server's signal handling turns the first signal into a
drain and ends it when nothing is in flight or the bound has passed."""

from __future__ import annotations

import signal
import time

import uvicorn
from litestar.testing import TestClient

from api.app import create_app
from api.drain import Drain, DrainingServer, drain_of
from registry.db import make_engine
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv


def test_ready_then_draining(registry_env: RegistryEnv) -> None:
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        resp = client.get("/api/ready")
        assert resp.status_code == 200 and resp.json() == {"status": "ready"}
        assert client.get("/api/experts", headers=registry_env.query).status_code == 200

        drain_of(client.app.state).begin()
        resp = client.get("/api/ready")
        assert resp.status_code == 503 and resp.json() == {"status": "draining"}
        refused = client.get("/api/experts", headers=registry_env.query)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "draining" and refused.json()["error"]["type"] == "server_error"
        refused = client.post("/v1/chat/completions", json={"model": "x", "messages": []})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert client.get("/api/health").status_code == 200  # the probes answer throughout


def test_not_ready_while_the_database_does_not_answer(registry_env: RegistryEnv) -> None:
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        runtime = client.app.state.runtime
        working = runtime.db_engine
        dead = make_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")  # nothing listens there
        runtime.db_engine = dead
        try:
            resp = client.get("/api/ready")
            assert resp.status_code == 503 and resp.json() == {"status": "database unreachable"}
        finally:
            runtime.db_engine = working
            client.blocking_portal.call(dead.dispose)
        assert client.get("/api/ready").status_code == 200


def test_the_first_signal_drains_and_a_second_stops_waiting() -> None:
    async def app(scope: object, receive: object, send: object) -> None:  # never called
        raise AssertionError

    drain = Drain(bound_s=0.3)
    server = DrainingServer(uvicorn.Config(app), drain)
    server.handle_exit(signal.SIGTERM, None)  # before it started: stop at once, no drain
    assert server.should_exit and not drain.draining

    drain = Drain(bound_s=0.3)
    server = DrainingServer(uvicorn.Config(app), drain)
    server.started = True
    drain.in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert drain.draining and not server.should_exit and not drain.finished()
    drain.in_flight = 0
    assert drain.finished()  # nothing in flight any more

    drain.in_flight = 1
    time.sleep(0.35)
    assert drain.finished()  # the bound has passed

    server.handle_exit(signal.SIGINT, None)  # asked again: stop now
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGINT, None)  # a third Ctrl-C forces, as in uvicorn
    assert server.force_exit
