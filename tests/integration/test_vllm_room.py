"""Room for vLLM servers under ``max_servers`` (issue 21): a server that served within ``keep_warm_s`` is never
stopped to make room; a request that finds no room waits (first come, first served) up to ``server_wait_s``,
then gets EngineUnavailable (503) with a Retry-After of when a server becomes stoppable.

This tests the fleet's *policy*, so a real vLLM start (30-60 s each) is not needed: POLICY_STAND_IN, a tiny
HTTP server answering /health, /v1/models and /v1/completions like vLLM, stands in for
`python -m vllm.entrypoints.openai.api_server`. Everything else is the engine's own code: command line, port,
environment, launcher, supervision, stopping, HTTP client. Real vLLM servers making room: test_vllm_engine.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.engine import EngineUnavailable, GenRequest, GenResult, Sampling, Target
from serving.vllm import VLLMConfig, VLLMEngine
from serving.vllm_process import server_command
from serving.vllm_server import Server
from serving.vllm_supervisor import Supervisor
from tests.fixtures.live import free_port

# A prompt "hold:<path>" is answered only once <path> exists (it writes <path>.held on arrival), so a test can
# keep a request in flight for as long as it needs, without timing.
POLICY_STAND_IN = r"""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
arg = lambda name: args[args.index(name) + 1]
name, host, port = arg("--served-model-name"), arg("--host"), int(arg("--port"))

class Handler(BaseHTTPRequestHandler):
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send({})
        elif self.path == "/v1/models":
            self._send({"object": "list", "data": [{"id": name, "object": "model", "parent": None}]})
        else:
            self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body.get("prompt", "")
        if prompt.startswith("hold:"):
            release = prompt[len("hold:"):]
            open(release + ".held", "w").close()
            while not os.path.exists(release):
                time.sleep(0.02)
        self._send({
            "id": "cmpl-1", "object": "text_completion", "model": body["model"],
            "choices": [{"index": 0, "text": "served by " + name, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        })

    def log_message(self, *_):
        pass

ThreadingHTTPServer((host, port), Handler).serve_forever()
"""


@pytest.fixture
def policy_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Managed servers run POLICY_STAND_IN with the arguments vLLM would get."""

    def command(**kw: Any) -> list[str]:
        real = server_command(**kw)  # [python, -m, vllm.entrypoints.openai.api_server, --model, ...]
        return [sys.executable, "-c", POLICY_STAND_IN, *real[3:]]

    monkeypatch.setattr("serving.vllm_supervisor.server_command", command)
    yield


def _engine(tmp_path: Path, **kw: Any) -> VLLMEngine:
    return VLLMEngine(VLLMConfig(port_start=free_port(), log_dir=tmp_path / "logs", compile=False, max_servers=1, **kw))


def _target(tmp_path: Path, base_id: str) -> Target:
    return Target(base_id=base_id, base_dir=tmp_path)


async def _ask(engine: VLLMEngine, target: Target, prompt: str = "hi") -> GenResult | BaseException:
    [result] = await engine.generate([GenRequest(target, Sampling(max_tokens=3), prompt=prompt)])
    return result


def _served_by(result: GenResult | BaseException, base_id: str) -> None:
    assert isinstance(result, GenResult), f"request failed: {result!r}"
    assert result.text == f"served by {base_id}"


async def _running(engine: VLLMEngine) -> dict[str, int]:
    """Base id -> pid of each live server."""
    return {e["base_id"]: e["pid"] for e in await engine.status() if e["state"] == "ready" and e["pid"]}


async def test_a_warm_server_is_not_stopped_and_the_newcomer_is_told_when_to_retry(
    tmp_path: Path, policy_stand_in: None
) -> None:
    """max_servers=1: a second base asked for within keep-warm of the first's last request gets 503 with a
    Retry-After within keep-warm, the first server untouched; retried after that, it gets the room."""
    engine = _engine(tmp_path, keep_warm_s=4, server_wait_s=0.05)
    first, second = _target(tmp_path, "first"), _target(tmp_path, "second")
    try:
        _served_by(await _ask(engine, first), "first")
        before = await _running(engine)

        refused = await _ask(engine, second)
        assert isinstance(refused, EngineUnavailable), refused
        assert 1 <= refused.retry_after <= 4 and "keep-warm" in refused.message
        assert await _running(engine) == before  # the warm server was not stopped (same process)

        await asyncio.sleep(refused.retry_after)  # a client honouring Retry-After
        _served_by(await _ask(engine, second), "second")
        assert list(await _running(engine)) == ["second"]
    finally:
        await engine.close()


async def test_a_waiting_request_gets_the_room_once_the_busy_server_is_done(
    tmp_path: Path, policy_stand_in: None
) -> None:
    """A busy server is never stopped for another base: the newcomer waits, and gets the room once the
    request in flight has finished (and the short keep-warm after it has passed)."""
    engine = _engine(tmp_path, keep_warm_s=0.2, server_wait_s=120)
    release = tmp_path / "release"
    first, second = _target(tmp_path, "first"), _target(tmp_path, "second")
    try:
        busy = asyncio.create_task(_ask(engine, first, f"hold:{release}"))
        while not Path(f"{release}.held").exists():  # the first request is in flight
            await asyncio.sleep(0.02)
        waiting = asyncio.create_task(_ask(engine, second))
        await asyncio.sleep(0.5)  # long enough for a refusal or a stop to show
        assert not waiting.done(), waiting.result()
        assert list(await _running(engine)) == ["first"]

        release.touch()
        _served_by(await busy, "first")  # finished normally: its server was not stopped under it
        _served_by(await waiting, "second")
        assert list(await _running(engine)) == ["second"]
    finally:
        release.touch()
        await engine.close()


async def test_waiters_take_freed_room_in_turn_never_above_max_servers(
    tmp_path: Path, policy_stand_in: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two bases waiting for the one slot: the first to ask starts first, the second only after the first's
    server has served it and cooled; no launch ever happens while another server process is alive."""
    engine = _engine(tmp_path, keep_warm_s=0.2, server_wait_s=120)
    launched: list[Server] = []
    alive_at_launch: dict[str, list[str]] = {}
    launch = Supervisor.launch

    def counting_launch(self: Supervisor, server: Server) -> None:
        alive_at_launch[server.base_id] = [s.base_id for s in launched if s.proc is not None and s.proc.alive]
        launched.append(server)
        launch(self, server)

    monkeypatch.setattr(Supervisor, "launch", counting_launch)
    try:
        _served_by(await _ask(engine, _target(tmp_path, "first")), "first")
        second, third = await asyncio.gather(
            _ask(engine, _target(tmp_path, "second")), _ask(engine, _target(tmp_path, "third"))
        )
        _served_by(second, "second")
        _served_by(third, "third")
        assert [s.base_id for s in launched] == ["first", "second", "third"]
        assert alive_at_launch == {"first": [], "second": [], "third": []}
        assert list(await _running(engine)) == ["third"]
    finally:
        await engine.close()


def test_negative_waits_are_refused() -> None:
    with pytest.raises(ValueError, match="keep_warm_s must not be negative"):
        VLLMConfig(keep_warm_s=-1)
    with pytest.raises(ValueError, match="server_wait_s must not be negative"):
        VLLMConfig(server_wait_s=-1)
