"""/api/keys (admin scope) on SQLite and PostgreSQL: create with every option, list, get, revoke, rotate; the
secret is shown once and never again (nor its hash); expiry; a model allow-list on /v1 and /api/route; every
refusal a 4xx naming its field with nothing written."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import func, select

from api.app import create_app
from registry import db
from registry.keys import hash_key
from registry.models import ApiKey
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import register

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[TestClient]:  # type: ignore[type-arg]
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        yield client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def key_count(url: str) -> int:
    async def go() -> int:
        engine = db.make_engine(url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                return int(await session.scalar(select(func.count()).select_from(ApiKey)) or 0)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def assert_error(resp: Any, status: int, param: str, type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    if type_:
        assert error["type"] == type_
    return error  # type: ignore[no-any-return]


def test_key_lifecycle(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    admin = registry_env.admin
    body = {
        "name": "app",
        "scopes": ["query"],
        "models": ["tiny-base"],
        "rpm_limit": 100,
        "tpm_limit": 10_000,
        "token_budget": 1_000_000,
        "duration": "30d",
    }
    resp = client.post("/api/keys", json=body, headers=admin)
    assert resp.status_code == 201, resp.text
    made = resp.json()
    secret = made["key"]
    assert secret.startswith("mk-") and made["prefix"] == secret[:10] and made["status"] == "active"
    assert {k: made[k] for k in ("models", "rpm_limit", "tpm_limit", "token_budget")} == {
        k: body[k] for k in ("models", "rpm_limit", "tpm_limit", "token_budget")
    }
    expires = datetime.fromisoformat(made["expires_at"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert made["usage"] == {"counted": True, "requests": 0, "tokens": 0, "minute_requests": 0, "minute_tokens": 0}

    # the new key works, and its use is counted
    assert client.get("/v1/models", headers=bearer(secret)).status_code == 200

    # listed and shown by id or prefix, without the secret or its hash
    listing = client.get("/api/keys", headers=admin)
    assert listing.status_code == 200
    assert secret not in listing.text and hash_key(secret) not in listing.text and '"key"' not in listing.text
    assert {k["name"] for k in listing.json()["data"]} == {"admin", "reader", "app"}
    assert listing.json()["total"] == 3
    shown = client.get(f"/api/keys/{made['id']}", headers=admin).json()
    assert client.get(f"/api/keys/{made['prefix']}", headers=admin).json()["id"] == made["id"]
    assert "key" not in shown and secret not in str(shown)
    assert shown["usage"]["requests"] == 1 and shown["usage"]["minute_requests"] == 1 and shown["last_used_at"]

    # rotate: a new secret, the same settings and usage, the old secret refused at once
    resp = client.post(f"/api/keys/{made['id']}/rotate", headers=admin)
    assert resp.status_code == 201, resp.text
    rotated = resp.json()
    new_secret = rotated["key"]
    assert new_secret != secret and rotated["id"] != made["id"] and rotated["rotated_from"] == made["id"]
    for field in ("name", "scopes", "models", "rpm_limit", "tpm_limit", "token_budget", "expires_at"):
        assert rotated[field] == made[field], field
    assert rotated["usage"]["requests"] == 1
    refused = client.get("/v1/models", headers=bearer(secret))
    assert_error(refused, 401, "authorization", "authentication_error")
    assert "revoked" in refused.json()["error"]["message"]
    assert client.get("/v1/models", headers=bearer(new_secret)).status_code == 200
    old = client.get(f"/api/keys/{made['id']}", headers=admin).json()
    assert old["status"] == "revoked" and old["revoked_at"]

    # revoke: refused at once; revoking again changes nothing
    resp = client.delete(f"/api/keys/{rotated['id']}", headers=admin)
    assert resp.status_code == 200 and resp.json()["status"] == "revoked" and "key" not in resp.json()
    assert_error(client.get("/v1/models", headers=bearer(new_secret)), 401, "authorization")
    again = client.delete(f"/api/keys/{rotated['id']}", headers=admin)
    assert again.status_code == 200 and again.json()["revoked_at"] == resp.json()["revoked_at"]
    # a revoked key cannot be rotated back to life
    assert_error(client.post(f"/api/keys/{rotated['id']}/rotate", headers=admin), 409, "id")
    # revoked keys can be left out of the list
    active = client.get("/api/keys", params={"include_revoked": "false"}, headers=admin).json()
    assert {k["name"] for k in active["data"]} == {"admin", "reader"}


def test_key_routes_need_the_admin_scope(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    before = key_count(registry_env.settings.database_url)
    reader = registry_env.query
    for method, path in (("GET", "/api/keys"), ("POST", "/api/keys"), ("GET", "/api/keys/x"),
                         ("DELETE", "/api/keys/x"), ("POST", "/api/keys/x/rotate")):  # fmt: skip
        resp = client.request(method, path, headers=reader, json={"name": "sneaky"} if method == "POST" else None)
        assert_error(resp, 403, "authorization", "permission_error")
        assert_error(client.request(method, path), 401, "authorization")
    assert key_count(registry_env.settings.database_url) == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "rpm_limit": 0}, "rpm_limit"),
        ({"name": "x", "tpm_limit": -5}, "tpm_limit"),
        ({"name": "x", "token_budget": 10**18}, "token_budget"),
        ({"name": "x", "rpm_limit": "many"}, "rpm_limit"),
        ({"name": "x", "duration": "forever"}, "duration"),
        ({"name": "x", "duration": "0d"}, "duration"),
        ({"name": "x", "duration": "1d", "expires_at": "2099-01-01T00:00:00Z"}, "duration"),
        ({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "x", "expires_at": "next tuesday"}, "expires_at"),
        ({"name": "x", "models": []}, "models"),
        ({"name": "x", "models": ["ok", ""]}, "models[1]"),
        ({"name": "x", "models": ["m"] * 1001}, "models"),
        ({"name": "x", "scopes": ["root"]}, "scopes"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"scopes": ["query"]}, "name"),
        ({"name": "x", "key_hash": "0" * 64}, "key_hash"),
    ],
)
def test_bad_key_settings_are_refused(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    body: dict[str, Any],
    param: str,
) -> None:
    before = key_count(registry_env.settings.database_url)
    error = assert_error(client.post("/api/keys", json=body, headers=registry_env.admin), 400, param)
    assert error["type"] == "invalid_request_error"
    assert key_count(registry_env.settings.database_url) == before


def test_unknown_keys_and_the_last_admin_key(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    admin = registry_env.admin
    assert_error(client.get("/api/keys/00000000-0000-0000-0000-000000000000", headers=admin), 404, "id")
    assert_error(client.delete("/api/keys/mk-nothere", headers=admin), 404, "id")
    listing = client.get("/api/keys", headers=admin).json()["data"]
    (admin_id,) = [k["id"] for k in listing if "admin" in k["scopes"]]
    # the only admin key cannot be revoked (no one could manage keys any more) ...
    error = assert_error(client.delete(f"/api/keys/{admin_id}", headers=admin), 409, "id")
    assert "last active admin key" in error["message"]
    assert client.get("/api/keys", headers=admin).status_code == 200
    # ... but it can once there is another
    second = client.post("/api/keys", json={"name": "admin2", "scopes": ["admin"]}, headers=admin).json()["key"]
    assert client.delete(f"/api/keys/{admin_id}", headers=bearer(second)).status_code == 200
    assert_error(client.get("/api/keys", headers=admin), 401, "authorization")


def test_an_expired_key_is_refused(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    at = datetime.now(UTC) + timedelta(seconds=2)
    made = client.post(
        "/api/keys", json={"name": "short", "expires_at": at.isoformat()}, headers=registry_env.admin
    ).json()
    assert client.get("/v1/models", headers=bearer(made["key"])).status_code == 200  # memoized from here on
    time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 0.1)
    error = assert_error(client.get("/v1/models", headers=bearer(made["key"])), 401, "authorization")
    assert "expired" in error["message"] and error["code"] == "expired_api_key"
    assert client.get(f"/api/keys/{made['id']}", headers=registry_env.admin).json()["status"] == "expired"


def test_a_model_allow_list(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    admin = registry_env.admin
    for name in ("combo", "other-combo"):
        resp = client.post("/api/compositions", json={"name": name, "experts": ["tiny-base"]}, headers=admin)
        assert resp.status_code == 201, resp.text
    made = client.post("/api/keys", json={"name": "narrow", "models": ["tiny-base", "combo"]}, headers=admin).json()
    narrow = bearer(made["key"])

    # /v1/models lists only the allowed ones (an unrestricted key sees every model)
    assert {m["id"] for m in client.get("/v1/models", headers=narrow).json()["data"]} == {"tiny-base", "combo"}
    everything = {m["id"] for m in client.get("/v1/models", headers=registry_env.query).json()["data"]}
    assert everything == {"tiny-base", "combo", "other-combo"}

    chat = {"messages": CHAT, "max_tokens": 2, "temperature": 0}
    ok = client.post("/v1/chat/completions", json={**chat, "model": "tiny-base"}, headers=narrow)
    assert ok.status_code == 200, ok.text
    for path, body in (
        ("/v1/chat/completions", {**chat, "model": "other-combo"}),
        ("/v1/completions", {"model": "other-combo", "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {**chat, "model": "no-such-model"}),  # refused before it is looked up
        ("/api/route", {"model": "other-combo", "query": "hi"}),
    ):
        error = assert_error(client.post(path, json=body, headers=narrow), 403, "model", "permission_error")
        assert error["code"] == "model_not_allowed" and body["model"] in error["message"]
    assert client.post("/api/route", json={"model": "combo", "query": "hi"}, headers=narrow).status_code == 200
    # a key without a list is not limited by another key's list
    resp = client.post("/api/route", json={"model": "other-combo", "query": "hi"}, headers=registry_env.query)
    assert resp.status_code == 200
