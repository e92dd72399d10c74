"""Admin panel sessions live in the database (SQLite and PostgreSQL): signing out ends the session server-side,
so a copied cookie replayed afterwards is sent to sign in; revoking the key ends all of its sessions. And the
keys page: list (prefix, never a secret), create with every option (the secret shown once), revoke, rotate,
inline form errors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import select

from api.app import create_app
from registry import db
from registry.keys import hash_key
from registry.models import AdminSession
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
COOKIE = "moerge_admin"


def _token(html: str) -> str:
    found = re.search(r'name="_csrf_token" value="([^"]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


@pytest.fixture
def client(registry_env: RegistryEnv) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        yield client


def sign_in(client: TestClient, key: str) -> None:  # type: ignore[type-arg]
    token = _token(client.get("/admin/login").text)
    resp = client.post("/admin/login", data={"key": key, "_csrf_token": token, "next": "/admin/"})
    assert resp.status_code == 200 and "Dashboard" in resp.text, resp.text[:300]


def replay(client: TestClient, cookie: str, path: str = "/admin/", **headers: str) -> Any:  # type: ignore[type-arg]
    """The request a thief holding a copy of the cookie would send (nothing else from the browser)."""
    client.cookies.clear()
    return client.get(path, headers={"cookie": f"{COOKIE}={cookie}", **headers}, follow_redirects=False)


def sessions(database_url: str) -> list[AdminSession]:
    async def go() -> list[AdminSession]:
        engine = db.make_engine(database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                return list(await session.scalars(select(AdminSession).order_by(AdminSession.created_at)))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_signing_out_ends_the_session_server_side(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    sign_in(client, registry_env.admin_key)
    cookie = client.cookies.get(COOKIE)
    assert cookie and registry_env.admin_key not in cookie and hash_key(registry_env.admin_key) not in cookie
    (row,) = sessions(registry_env.settings.database_url)
    assert row.ended_at is None
    assert replay(client, cookie).status_code == 200  # the copy works while the session lives

    client.cookies.set(COOKIE, cookie, path="/admin")
    token = _token(client.get("/admin/").text)
    resp = client.post("/admin/logout", data={"_csrf_token": token}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/admin/login"
    (row,) = sessions(registry_env.settings.database_url)
    assert row.ended_at is not None

    resp = replay(client, cookie)  # the copied cookie after sign-out
    assert resp.status_code == 303 and resp.headers["location"].startswith("/admin/login")
    resp = replay(client, cookie, "/admin/keys/", **{"hx-request": "true"})
    assert resp.status_code == 401 and resp.headers["hx-redirect"].startswith("/admin/login")
    # signing in again starts a new session; the old one stays ended
    sign_in(client, registry_env.admin_key)
    assert client.cookies.get(COOKIE) != cookie
    assert replay(client, cookie).status_code == 303


def test_revoking_the_key_ends_its_sessions(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    made = client.post("/api/keys", json={"name": "second", "scopes": ["admin"]}, headers=registry_env.admin).json()
    sign_in(client, made["key"])
    first = client.cookies.get(COOKIE)
    client.cookies.clear()
    sign_in(client, made["key"])
    second = client.cookies.get(COOKIE)
    assert first and second and first != second
    assert replay(client, first).status_code == 200 and replay(client, second).status_code == 200

    assert client.delete(f"/api/keys/{made['id']}", headers=registry_env.admin).status_code == 200
    rows = sessions(registry_env.settings.database_url)
    assert len(rows) == 2 and all(r.ended_at is not None for r in rows)
    assert replay(client, first).status_code == 303 and replay(client, second).status_code == 303


def test_keys_page(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    sign_in(client, registry_env.admin_key)
    page = client.get("/admin/keys/")
    assert page.status_code == 200 and "API keys" in page.text
    assert registry_env.admin_key[:10] in page.text  # the prefix ...
    assert registry_env.admin_key not in page.text and registry_env.query_key not in page.text  # ... not the key
    assert 'href="/admin/keys/"' in page.text  # in the nav

    # a refusal is shown beside its field, nothing is created
    form = {"_csrf_token": _token(page.text), "name": "app", "scopes": ["query"], "rpm_limit": "0"}
    resp = client.post("/admin/keys/", data=form)
    assert resp.status_code == 400 and 'id="rpm_limit-error"' in resp.text and "new-key" not in resp.text
    resp = client.post("/admin/keys/", data={**form, "rpm_limit": "10", "duration": "soon"})
    assert resp.status_code == 400 and 'id="duration-error"' in resp.text
    assert "app" not in [k["name"] for k in client.get("/api/keys", headers=registry_env.admin).json()["data"]]

    # created with every option: the secret once
    form = {**form, "rpm_limit": "10", "tpm_limit": "1000", "token_budget": "50000", "duration": "7d",
            "models": "tiny-base, combo"}  # fmt: skip
    resp = client.post("/admin/keys/", data=form)
    assert resp.status_code == 201, resp.text[-500:]
    secret = re.search(r'<code id="new-key-secret">([^<]+)</code>', resp.text)
    assert secret is not None
    (made,) = [k for k in client.get("/api/keys", headers=registry_env.admin).json()["data"] if k["name"] == "app"]
    assert (made["rpm_limit"], made["tpm_limit"], made["token_budget"]) == (10, 1000, 50000)
    assert made["models"] == ["tiny-base", "combo"] and made["expires_at"] and made["prefix"] == secret[1][:10]
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {secret[1]}"}).status_code == 200
    later = client.get("/admin/keys/").text
    assert secret[1] not in later and made["prefix"] in later

    # rotate: a new secret shown once, the old one revoked
    resp = client.post("/admin/keys/rotate", data={"_csrf_token": _token(later), "id": made["id"]})
    assert resp.status_code == 200
    rotated = re.search(r'<code id="new-key-secret">([^<]+)</code>', resp.text)
    assert rotated is not None and rotated[1] != secret[1]
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {secret[1]}"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {rotated[1]}"}).status_code == 200

    # revoke
    new_id = next(k["id"] for k in client.get("/api/keys", headers=registry_env.admin).json()["data"]
                  if k["prefix"] == rotated[1][:10])  # fmt: skip
    resp = client.post("/admin/keys/revoke", data={"_csrf_token": _token(resp.text), "id": new_id})
    assert resp.status_code == 200 and "revoked app" in resp.text
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {rotated[1]}"}).status_code == 401
    # revoked keys are listed on request only
    assert new_id not in client.get("/admin/keys/").text and new_id in client.get("/admin/keys/?revoked=1").text

    # revoking the key of this very session signs it out
    (me,) = [k for k in client.get("/api/keys", headers=registry_env.admin).json()["data"] if k["name"] == "admin"]
    other = client.post("/api/keys", json={"name": "spare", "scopes": ["admin"]}, headers=registry_env.admin)
    assert other.status_code == 201
    resp = client.post(
        "/admin/keys/revoke", data={"_csrf_token": _token(client.get("/admin/keys/").text), "id": me["id"]}
    )
    assert resp.status_code == 200
    assert client.get("/admin/keys/", follow_redirects=False).status_code == 303
