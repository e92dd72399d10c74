"""The admin panel without a browser (the browser flows are in tests/browser/): who may reach it, CSRF on
every form, each page rendered as HTML, inline form errors, pagination, HTMX fragments, errors as pages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from api.app import create_app
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register
from tests.fixtures.tiny import build_tiny_lora

PAGES = [
    "/admin/",
    "/admin/experts/",
    "/admin/experts/new",
    "/admin/experts/tiny-base",
    "/admin/compositions/",
    "/admin/compositions/new",
    "/admin/playground/",
    "/admin/merges/",
    "/admin/evals/",
]


def _token(html: str) -> str:
    found = re.search(r'name="_csrf_token" value="([^"]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


@pytest.fixture
def client(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[TestClient]:  # type: ignore[type-arg]
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        yield client


def sign_in(client: TestClient, key: str) -> tuple[int, str]:  # type: ignore[type-arg]
    token = _token(client.get("/admin/login").text)
    resp = client.post("/admin/login", data={"key": key, "_csrf_token": token, "next": "/admin/"})
    return resp.status_code, resp.text


def test_pages_need_an_admin_session(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    for path in PAGES:
        resp = client.get(path, follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/admin/login"), path
    # a Bearer admin key is for the API, not a session
    resp = client.get("/admin/", headers=registry_env.admin, follow_redirects=False)
    assert resp.status_code == 303
    # HTMX requests are told to load the sign-in page
    resp = client.get("/admin/merges/x/progress", headers={"hx-request": "true"}, follow_redirects=False)
    assert resp.status_code == 401 and resp.headers["hx-redirect"].startswith("/admin/login")
    status, html = sign_in(client, registry_env.query_key)
    assert status == 401 and "no admin scope" in html
    assert client.get("/admin/", follow_redirects=False).status_code == 303
    status, html = sign_in(client, "mk-not-a-key-at-all-000")
    assert status == 401 and "invalid API key" in html
    status, html = sign_in(client, registry_env.admin_key)
    assert status == 200 and "Dashboard" in html
    cookie = client.cookies.get("moerge_admin")
    assert cookie and registry_env.admin_key not in cookie
    for path in PAGES:
        resp = client.get(path)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html"), path
    token = _token(client.get("/admin/").text)
    assert client.post("/admin/logout", data={"_csrf_token": token}).url.path == "/admin/login"
    assert client.get("/admin/", follow_redirects=False).status_code == 303


def test_forms_need_the_csrf_token(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    resp = client.post("/admin/login", data={"key": registry_env.admin_key})
    assert resp.status_code == 403 and "CSRF" in resp.text and resp.headers["content-type"].startswith("text/html")
    sign_in(client, registry_env.admin_key)
    resp = client.post("/admin/compositions/new", data={"name": "x"})
    assert resp.status_code == 403
    resp = client.post("/admin/compositions/new", data={"name": "x"}, headers={"x-csrftoken": "forged" * 10})
    assert resp.status_code == 403
    # the JSON API is not affected (it takes Bearer keys, no cookies)
    resp = client.post("/api/compositions", json={"name": "y", "experts": ["tiny-base"]}, headers=registry_env.admin)
    assert resp.status_code == 201, resp.text
    # the playground as a plain form post (no JavaScript): the whole page, with the decision and the answer
    token = _token(client.get("/admin/playground/").text)
    form = {"_csrf_token": token, "composition": "y", "query": "hello", "max_tokens": "4"}
    resp = client.post("/admin/playground/", data=form)
    assert resp.status_code == 200 and "<html" in resp.text and "Routing decision" in resp.text, resp.text[-800:]
    assert 'id="aggregate"' in resp.text and "tiny-base" in resp.text
    # an expert's name is not a composition
    resp = client.post("/admin/playground/", data={**form, "composition": "tiny-base"}, headers={"hx-request": "true"})
    assert "no composition named" in resp.text and "<html" not in resp.text


def test_inline_errors_pagination_and_fragments(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    sign_in(client, registry_env.admin_key)
    token = _token(client.get("/admin/experts/new").text)
    # import mode, a path outside the import roots: the error sits beside the path field
    resp = client.post(
        "/admin/experts/new",
        data={"_csrf_token": token, "mode": "import", "path": str(tmp_path), "slug": "outside"},
        files={"archive": ("", b"", "application/octet-stream")},
    )
    assert resp.status_code == 403  # outside the import roots
    assert re.search(r'id="path-error"', resp.text) and 'value="outside"' in resp.text
    # a slug that breaks the rules: beside the slug field
    resp = client.post(
        "/admin/experts/new",
        data={"_csrf_token": token, "mode": "upload", "slug": "Bad Slug"},
        files={"archive": ("a.tar", b"not a tar", "application/x-tar")},
    )
    assert resp.status_code == 400 and 'id="slug-error"' in resp.text
    # an import that works lands on the card
    folder = build_tiny_lora(tiny_base, registry_env.settings.import_roots[0] / "lora-0", seed=1)
    resp = client.post(
        "/admin/experts/new",
        data={"_csrf_token": token, "mode": "import", "path": str(folder), "slug": "lora-0", "base": "tiny-base"},
        files={"archive": ("", b"", "application/octet-stream")},
    )
    assert resp.status_code == 200 and resp.url.path == "/admin/experts/lora-0", resp.text[:300]
    assert "<svg" in resp.text and "tiny-base" in resp.text
    # more experts than a page: pagination keeps the filters
    for i in range(1, 22):
        register(
            registry_env.settings,
            build_tiny_lora(tiny_base, tmp_path / f"l{i}", seed=i),
            ExpertSpec(slug=f"lora-{i}", base="tiny-base"),
        )
    page = client.get("/admin/experts/?kind=adapter").text
    assert "1–20 of 22" in page and "offset=20" in page and "kind=adapter" in page
    assert "21–22 of 22" in client.get("/admin/experts/?kind=adapter&offset=20").text
    assert "1–1 of 1" in client.get("/admin/experts/?q=LORA-13").text
    # a merge refused: the launcher shows the error beside the field it names
    token = _token(client.get("/admin/merges/").text)
    resp = client.post("/admin/merges/", data={"_csrf_token": token, "method": "ties", "models": ["lora-1"]})
    assert resp.status_code in (400, 422) and ('class="error"' in resp.text or 'class="banner"' in resp.text)
    # an error inside the panel is a page; inside an HTMX request, a fragment
    resp = client.get("/admin/experts/nobody")
    assert resp.status_code == 404 and "no expert named" in resp.text and "<html" in resp.text
    resp = client.get("/admin/merges/00000000-0000-0000-0000-000000000000/progress", headers={"hx-request": "true"})
    assert resp.status_code == 200 and "banner" in resp.text and "<html" not in resp.text


def test_playground_shows_token_routes(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    """A token-level composition in the playground: its per-token, per-layer choices as a grid."""
    for i, slug in enumerate(("tok-a", "tok-b")):
        register(
            registry_env.settings,
            build_tiny_lora(tiny_base, tmp_path / slug, seed=70 + i),
            ExpertSpec(slug=slug, base="tiny-base"),
        )
    sign_in(client, registry_env.admin_key)
    form_page = client.get("/admin/compositions/new").text
    assert '<option value="arrow"' in form_page  # token-level routers are offered
    body = {"name": "tok", "router": "arrow", "router_params": {"top_k": 1}, "experts": ["tok-a", "tok-b"]}
    assert client.post("/api/compositions", json=body, headers=registry_env.admin).status_code == 201
    token = _token(client.get("/admin/playground/").text)
    form = {"_csrf_token": token, "composition": "tok", "query": "hello there", "max_tokens": "3"}
    resp = client.post("/admin/playground/", data=form, headers={"hx-request": "true"})
    assert resp.status_code == 200 and 'id="trace"' in resp.text, resp.text[-800:]
    rows = re.findall(r"<tr><th>(\d+)</th>", resp.text)
    assert rows == ["0", "1"]  # one row per decoder layer
    assert "tok-a" in resp.text and "tok-b" in resp.text
