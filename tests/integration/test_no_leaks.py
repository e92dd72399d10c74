"""Nothing secret leaks to a caller without the admin scope (issue 18, item 6): /api/health says only ok or
degraded, /api/engines shows no pid, URL, folder, log path or log tail, and an engine failure reaches a /v1
caller as a message naming the model and where an admin reads why, never a path or a log line.

The torch engine fails for real (a registered base and adapter whose stored folders lost their config files).
vLLM cannot run here, so for its failed start a short Python program stands in for the vLLM server (FAKE_VLLM):
it is started by the engine's own code (port, command, environment, launcher, log, supervision) and fails the
way vLLM does, with a traceback naming the model folder on stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import text

from api.app import create_app
from api.exceptions import REDACTED, redact_local_paths
from core.errors import ValidationFailed
from registry import db
from registry.schemas import ExpertSpec
from serving.dispatch import EngineSet
from serving.engine import EngineUnavailable, GenerationFailed
from serving.torch_engine import TorchEngine
from serving.vllm import VLLMConfig, VLLMEngine
from serving.vllm_client import Reply
from serving.vllm_openai import raise_for_status
from serving.vllm_server import Server
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import free_port, register

on_both = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
ADMIN_ONLY_FIELDS = {"pid", "url", "log", "last_error", "base_dir"}
SECRETS = {
    "MOERGE_SESSION_SECRET": "leak-check-session-secret",
    "MOERGE_ADMIN_KEY": "leak-check-admin-key",
    "MOERGE_DATABASE_URL": "postgresql+asyncpg://moerge:leak-check-db-password@db/moerge",
    "AWS_SECRET_ACCESS_KEY": "leak-check-aws-secret",
}


async def _execute(env: RegistryEnv, sql: str) -> None:
    engine = db.make_engine(env.settings.database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


def no_local_detail(message: str, env: RegistryEnv) -> None:
    home = env.settings.home
    assert str(home) not in message and str(home.resolve()) not in message, message
    assert "Traceback" not in message and "File " not in message and "config.json" not in message, message


@pytest.fixture
def broken_base(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> RegistryEnv:
    """`tiny-base` registered, with an adapter `lora` on it; then both stored folders lose a file the engine
    needs (a hard link removed: the blob and the registered digest stay)."""
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora", base="tiny-base"))
    for folder in registry_env.store.experts.iterdir():
        for name in ("config.json", "adapter_config.json"):
            (folder / name).unlink(missing_ok=True)
    return registry_env


@on_both
def test_health_minimal_without_an_admin_key(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> None:
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(registry_env.settings, tiny_lora, ExpertSpec(slug="wide-lora", base="tiny-base"))
    asyncio.run(_execute(registry_env, "UPDATE experts SET r = 1024 WHERE slug = 'wide-lora'"))  # an older row
    with TestClient(app=create_app(registry_env.settings)) as client:
        for headers in ({}, {"authorization": "Bearer not-a-key-at-all"}, {"x-api-key": "nope"}, registry_env.query):
            resp = client.get("/api/health", headers=headers)
            assert resp.status_code == 200 and resp.json() == {"status": "ok"}, (headers, resp.text)
        full = client.get("/api/health", headers=registry_env.admin)
        assert full.status_code == 200
        body = full.json()
        assert body["status"] == "ok" and body["checks"]["database"] == {"ok": True, "revision": db.head_revision()}
        assert body["checks"]["store"] == {"ok": True, "path": str(registry_env.store.root)}
        assert body["version"] and body["database_backend"] in ("sqlite+aiosqlite", "postgresql+asyncpg")
        # an adapter that cannot be served is named with the fix for admins; it does not make the server degraded
        (unservable,) = body["checks"]["unservable_adapters"]
        assert unservable["slug"] == "wide-lora" and "MOERGE_MAX_LORA_RANK" in unservable["fix"]

        store = registry_env.store.root
        store.rename(store.with_name("store-away"))
        try:
            resp = client.get("/api/health")
            assert resp.status_code == 503 and resp.json() == {"status": "degraded"}
            admin = client.get("/api/health", headers=registry_env.admin)
            assert admin.status_code == 503 and admin.json()["checks"]["store"]["ok"] is False
        finally:
            store.with_name("store-away").rename(store)


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@on_both
def test_torch_engine_failures_name_the_model_not_its_files(broken_base: RegistryEnv) -> None:
    env = broken_base
    kept = _Kept()  # on the engine's logger itself: the app's logging setup replaces the root's handlers
    logging.getLogger("serving.torch_engine").addHandler(kept)
    try:
        with TestClient(app=create_app(env.settings, engine=TorchEngine())) as client:
            base_id = client.get("/api/experts/tiny-base", headers=env.admin).json()["id"]
            for model in ("tiny-base", "lora"):
                for stream in (False, True):
                    resp = client.post(
                        "/v1/chat/completions", headers=env.query, json={**CHAT, "model": model, "stream": stream}
                    )
                    assert resp.status_code == 502, resp.text
                    error = resp.json()["error"]
                    assert error["code"] == "generation_failed" and f"'{base_id}'" in error["message"], error
                    assert "an admin can read why in moerge's log" in error["message"]
                    no_local_detail(error["message"], env)
            # the details are in moerge's log, for the operator
            assert any(str(env.store.expert_dir(base_id)) in m for m in kept.messages)

            (entry,) = client.get("/api/engines", headers=env.query).json()["servers"]
            assert not ADMIN_ONLY_FIELDS & set(entry) and entry["state"] == "not_loaded"
            (entry,) = client.get("/api/engines", headers=env.admin).json()["servers"]
            assert entry["base_dir"] == str(env.store.expert_dir(base_id))
    finally:
        logging.getLogger("serving.torch_engine").removeHandler(kept)


# Stands in for `python -m vllm.entrypoints.openai.api_server`: prints the environment it got, then dies at start
# like vLLM on a folder it cannot load.
FAKE_VLLM = r"""
import json, os, sys
model = sys.argv[sys.argv.index("--model") + 1]
print("ENV=" + json.dumps(dict(os.environ)), flush=True)
print("Traceback (most recent call last):", file=sys.stderr)
print(f'  File "{model}/modeling.py", line 1, in <module>', file=sys.stderr)
print(f"ValueError: no config.json in {model}", file=sys.stderr)
sys.exit(1)
"""


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def command(*, model_dir: Path, **_: Any) -> list[str]:
        return [sys.executable, "-c", FAKE_VLLM, "--model", str(model_dir)]

    monkeypatch.setattr("serving.vllm_supervisor.server_command", command)
    for name, value in SECRETS.items():  # in moerge's environment, as in a deployment
        monkeypatch.setenv(name, value)
    yield


@on_both
def test_vllm_start_failure_names_the_base_not_its_log(
    registry_env: RegistryEnv, tiny_base: Path, fake_vllm: None
) -> None:
    env = registry_env
    register(env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    config = VLLMConfig(port_start=free_port(), log_dir=env.settings.home / "logs", compile=False)
    engine = EngineSet(VLLMEngine(config))
    with TestClient(app=create_app(env.settings, engine=engine)) as client:
        try:
            base_id = client.get("/api/experts/tiny-base", headers=env.query).json()["id"]
            resp = client.post("/v1/chat/completions", headers=env.query, json={**CHAT, "model": "tiny-base"})
            assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1, resp.text
            message = resp.json()["error"]["message"]
            assert f"the vLLM server for base '{base_id}' failed to start" in message
            assert "GET /api/engines (admin key)" in message
            no_local_detail(message, env)
            assert "ValueError" not in message and "modeling.py" not in message

            (entry,) = client.get("/api/engines", headers=env.query).json()["servers"]
            assert entry["state"] == "dead" and not ADMIN_ONLY_FIELDS & set(entry), entry
            (entry,) = client.get("/api/engines", headers=env.admin).json()["servers"]
            assert "Traceback" in entry["last_error"] and "ValueError: no config.json" in entry["last_error"]
            log = Path(entry["log"])
            assert log.parent == env.settings.home / "logs"

            # the server process got no secret of moerge's environment
            (line,) = [ln for ln in log.read_text().splitlines() if ln.startswith("ENV=")]
            child = json.loads(line.removeprefix("ENV="))
            assert not set(SECRETS) & set(child) and not any(v in line for v in SECRETS.values())
            assert child["PATH"] and child["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        finally:
            client.blocking_portal.call(engine.close)


def test_redaction_backstop() -> None:
    """What reaches a non-admin caller has no path under the server's folders, even from an exception's own
    text; other text (routes, the caller's words) stays."""
    roots = ["/srv/moerge", "/tmp"]
    message = (
        "cannot load '/srv/moerge/store/experts/1234/config.json' (see /tmp/moerge-vllm/vllm-x.log); "
        "GET /api/engines; /srv/moerge-other/x and /tmpfile stay"
    )
    assert redact_local_paths(message, roots) == (
        f"cannot load '{REDACTED}' (see {REDACTED}); GET /api/engines; /srv/moerge-other/x and /tmpfile stay"
    )
    assert redact_local_paths("no paths here", []) == "no paths here"


def test_vllm_answers_reach_callers_without_its_internals() -> None:
    """vLLM's 4xx (the caller's input) is passed on; anything else, whose text can name files, is not."""
    server = Server(base_id="base-1", base_dir=None, remote=False)

    def reply(status: int, message: str) -> Reply:
        return Reply(status, json.dumps({"error": {"message": message, "param": "max_tokens"}}).encode())

    with pytest.raises(ValidationFailed, match="max_tokens is too large") as refused:
        raise_for_status(reply(400, "max_tokens is too large"), server)
    assert refused.value.param == "max_tokens"
    inside = "Traceback: File /srv/moerge/home/store/experts/x/model.safetensors"
    for status, kind in ((500, GenerationFailed), (503, EngineUnavailable)):
        with pytest.raises(kind) as failed:
            raise_for_status(reply(status, inside), server)
        assert "'base-1'" in failed.value.message and "/srv" not in failed.value.message
        assert "Traceback" not in failed.value.message
