"""The admin panel without a browser (the browser flows are in tests/browser/): who may reach it, CSRF on
every form, each page rendered as HTML, inline form errors, pagination, HTMX fragments, errors as pages."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin import views
from api.admin.auth import PUBLIC
from api.admin.views import LINEAGE_CHILDREN, PAGE_SIZE
from api.app import create_app
from core.settings import Settings
from registry import db
from registry.models import ApiKey, Base, Job, utcnow
from registry.schemas import ExpertSpec
from registry.services import ApiKeyService, hash_key
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import register
from tests.fixtures.tiny import build_tiny_finetune, build_tiny_lora

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
    # an offset past any database's range is refused, not a 500 (SQLite's OFFSET overflowed)
    for page in ("experts", "compositions", "merges", "keys", "evals"):
        assert client.get(f"/admin/{page}/?offset=30526071413387010048").status_code == 400, page
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


# --- every /admin route, taken from the app's route table --------------------------------------------------


def _admin_routes() -> list[Any]:
    """(method, path, public) of every /admin handler: a route added later is covered without editing this."""
    settings = Settings(
        home=Path("/nonexistent-moerge-home"),
        database_url="sqlite+aiosqlite://",
        import_roots=(),
        session_secret="route-table",
    )
    found = []
    for route in create_app(settings, engine=TorchEngine()).routes:
        if not route.path.startswith("/admin") or route.path.startswith("/admin/static"):
            continue
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                public = bool(handler.opt.get(PUBLIC))
                found.append(pytest.param(method, route.path, public, id=f"{method} {route.path}"))
    return found


ADMIN_ROUTES = _admin_routes()
SKIP_COLUMNS = {("api_keys", "last_used_at")}  # touched by signing in, not by the action under test


def _in_db(url: str, work: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        engine = db.make_engine(url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _snapshot(settings: Settings) -> dict[str, list[str]]:
    """Every row of every table (and the store's files): equal snapshots mean nothing changed."""

    async def rows(session: AsyncSession) -> dict[str, list[str]]:
        out = {}
        for table in Base.metadata.sorted_tables:
            columns = [c for c in table.c if (table.name, c.name) not in SKIP_COLUMNS]
            out[table.name] = sorted(repr(tuple(r)) for r in (await session.execute(select(*columns))).all())
        return out

    snapshot = _in_db(settings.database_url, rows)
    snapshot["store"] = sorted(str(p.relative_to(settings.store_dir)) for p in settings.store_dir.rglob("*"))
    return snapshot


def _new_admin_key(settings: Settings) -> str:
    async def make(session: AsyncSession) -> str:
        return (await ApiKeyService(session).create("panel-test", ["admin", "query"]))[1]

    return str(_in_db(settings.database_url, make))


def _change_key(settings: Settings, secret: str, how: str) -> None:
    """Through the ORM, so the registry epoch moves as it does when keys change for real."""

    async def change(session: AsyncSession) -> None:
        key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
        assert key is not None
        if how == "query-scope":
            key.scopes = ["query"]
        else:
            key.revoked = True
        await session.commit()

    _in_db(settings.database_url, change)


def _add_jobs(settings: Settings, count: int, *, status: str = "succeeded", prefix: str = "job") -> list[str]:
    """Merge job rows without running anything (a `running` one stays so: its heartbeat is fresh)."""

    async def add(session: AsyncSession) -> list[str]:
        jobs = [
            Job(
                status=status,
                method="ties",
                params={"config": {"name": f"{prefix}-{i:02d}"}},
                progress=1.0 if status == "succeeded" else 0.4,
                heartbeat_at=utcnow(),
            )
            for i in range(count)
        ]
        session.add_all(jobs)
        await session.commit()
        return [str(j.id) for j in jobs]

    return list(_in_db(settings.database_url, add))


@dataclass
class Panel:
    client: TestClient  # type: ignore[type-arg]
    settings: Settings
    ids: dict[str, str]  # path parameter -> a real value
    bodies: dict[str, dict[str, Any]]  # route path -> a form that changes something if it is accepted


def _panel_bodies(import_folder: Path) -> dict[str, dict[str, Any]]:
    return {
        "/admin/login": {"key": "", "next": "/admin/"},  # the key is filled in by the test
        "/admin/experts/new": {"mode": "import", "path": str(import_folder), "slug": "intruder", "base": "tiny-base"},
        "/admin/experts/{ref:str}/edit": {"description": "changed by an intruder", "tags": "intruded"},
        "/admin/experts/{ref:str}/delete": {"force": "on"},
        "/admin/experts/{ref:str}/try": {"message": "hello"},
        "/admin/compositions/new": {"name": "intruder-combo", "router": "direct", "experts": ["lora-a"], "k": "1"},
        "/admin/compositions/{name:str}/edit": {"description": "changed", "router": "direct", "experts": ["lora-a"]},
        "/admin/compositions/{name:str}/delete": {},
        "/admin/playground": {"composition": "combo", "query": "hello", "max_tokens": "2"},
        "/admin/merges": {"method": "ties", "base_model": "tiny-base", "models": ["ft-a", "ft-b"], "name": "intruded"},
        "/admin/merges/{job_id:str}/cancel": {},
    }


def _fill(path: str, ids: dict[str, str]) -> str:
    """The route's path with real ids (an unknown parameter fails the test: give it an id here)."""
    if path.startswith("/admin/evals/plot/"):
        return path.replace("{name:str}", "experts")
    return re.sub(r"\{(\w+):\w+\}", lambda m: ids[m[1]], path)


@pytest.fixture(scope="module")
def panel(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    """One app for every route (SQLite): tiny-base, an adapter, two finetunes, a composition, a running
    merge job (it stays running: nothing works on it), and a folder the register form could import."""
    root = tmp_path_factory.mktemp("admin-routes")
    imports = root / "imports"
    imports.mkdir()
    settings = Settings(
        home=root / "home",
        database_url=f"sqlite+aiosqlite:///{root / 'moerge.db'}",
        import_roots=(imports.resolve(),),
        merge_stale_after_s=3600,
    )
    db.upgrade(settings.database_url)
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, build_tiny_lora(tiny_base, root / "lora-a", seed=3), ExpertSpec(slug="lora-a", base="tiny-base"))
    for i, slug in enumerate(("ft-a", "ft-b")):
        register(
            settings, build_tiny_finetune(tiny_base, root / slug, seed=40 + i), ExpertSpec(slug=slug, base="tiny-base")
        )
    folder = build_tiny_lora(tiny_base, imports / "intruder", seed=4)
    with TestClient(create_app(settings, engine=TorchEngine())) as client:
        admin = {"Authorization": f"Bearer {_new_admin_key(settings)}"}
        resp = client.post("/api/compositions", json={"name": "combo", "experts": ["lora-a"]}, headers=admin)
        assert resp.status_code == 201, resp.text
        [job] = _add_jobs(settings, 1, status="running", prefix="running")
        ids = {"ref": "lora-a", "name": "combo", "job_id": job}
        yield Panel(client, settings, ids, _panel_bodies(folder))


def _send(client: TestClient, method: str, url: str, body: dict[str, Any] | None) -> Any:  # type: ignore[type-arg]
    if method == "GET":
        return client.get(url, follow_redirects=False)
    return client.post(url, data=body or {}, follow_redirects=False)


def _refused(resp: Any) -> bool:
    to_sign_in = resp.status_code == 303 and resp.headers["location"].startswith("/admin/login")
    return to_sign_in or resp.status_code in (401, 403)


@pytest.mark.parametrize(("method", "path", "public"), ADMIN_ROUTES)
def test_every_admin_route_is_guarded(panel: Panel, method: str, path: str, public: bool) -> None:
    """No session, a session whose key lost its admin scope or was revoked, a POST without the CSRF token:
    each refused, with nothing changed."""
    client, settings = panel.client, panel.settings
    url = _fill(path, panel.ids)
    body = dict(panel.bodies.get(path, {}))
    if path == "/admin/login":
        body["key"] = _new_admin_key(settings)

    if not public:
        client.cookies.clear()
        token = _token(client.get("/admin/login").text)  # a real token: only the session is missing
        before = _snapshot(settings)
        resp = _send(client, method, url, {**body, "_csrf_token": token})
        assert _refused(resp), (resp.status_code, resp.text[:300])
        assert _snapshot(settings) == before

        for how in ("query-scope", "revoked"):
            client.cookies.clear()
            secret = _new_admin_key(settings)
            assert sign_in(client, secret)[0] == 200
            token = _token(client.get("/admin/").text)
            _change_key(settings, secret, how)
            before = _snapshot(settings)
            resp = _send(client, method, url, {**body, "_csrf_token": token})
            assert _refused(resp), (how, resp.status_code, resp.text[:300])
            assert _snapshot(settings) == before, how
            assert _refused(client.get("/admin/", follow_redirects=False)), how  # and the session is gone

    if method == "POST":
        client.cookies.clear()
        assert sign_in(client, _new_admin_key(settings))[0] == 200
        before = _snapshot(settings)
        resp = _send(client, method, url, body)  # everything but the token
        assert resp.status_code == 403 and "CSRF" in resp.text, (resp.status_code, resp.text[:300])
        assert _snapshot(settings) == before
        assert client.get("/admin/", follow_redirects=False).status_code == 200  # still signed in (logout too)


def test_the_guarded_forms_do_change_things_when_allowed(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
) -> None:
    """The forms the guard test sends are effective: with a session and the token, each changes the registry
    (so "nothing changed" above is the guard's doing)."""
    settings = registry_env.settings
    register(
        settings, build_tiny_lora(tiny_base, settings.home / "la", seed=3), ExpertSpec(slug="lora-a", base="tiny-base")
    )
    for i, slug in enumerate(("ft-a", "ft-b")):
        register(
            settings,
            build_tiny_finetune(tiny_base, settings.home / slug, seed=40 + i),
            ExpertSpec(slug=slug, base="tiny-base"),
        )
    folder = build_tiny_lora(tiny_base, settings.import_roots[0] / "intruder", seed=4)
    resp = client.post("/api/compositions", json={"name": "combo", "experts": ["lora-a"]}, headers=registry_env.admin)
    assert resp.status_code == 201
    # running with a fresh heartbeat: the app's worker neither claims it (a queued one it would, and fail it
    # before the cancel under a slow machine) nor settles it as stale within the test
    [job] = _add_jobs(settings, 1, status="running", prefix="running")
    ids = {"ref": "lora-a", "name": "combo", "job_id": job}
    sign_in(client, registry_env.admin_key)
    order = [  # deletions last: the others need what they delete
        "/admin/merges/{job_id:str}/cancel",
        "/admin/experts/new",
        "/admin/experts/{ref:str}/edit",
        "/admin/compositions/new",
        "/admin/compositions/{name:str}/edit",
        "/admin/merges",
        "/admin/compositions/{name:str}/delete",
        "/admin/experts/{ref:str}/delete",
    ]
    bodies = _panel_bodies(folder)
    for path in order:
        token = _token(client.get("/admin/").text)
        before = _snapshot(settings)
        resp = client.post(_fill(path, ids), data={**bodies[path], "_csrf_token": token}, follow_redirects=False)
        assert resp.status_code == 303, (path, resp.status_code, re.findall(r'role="alert">([^<]*)', resp.text))
        assert _snapshot(settings) != before, path


# --- pagination, pickers, lineage -----------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_compositions_and_merges_paginate_in_the_query(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
) -> None:
    settings = registry_env.settings
    for i in range(PAGE_SIZE + 2):
        body = {"name": f"combo-{i:02d}", "experts": ["tiny-base"]}
        assert client.post("/api/compositions", json=body, headers=registry_env.admin).status_code == 201
    _add_jobs(settings, PAGE_SIZE + 1, prefix="done")
    _add_jobs(settings, 2, status="failed", prefix="broken")
    sign_in(client, registry_env.admin_key)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()).lower())

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        first = client.get("/admin/compositions/").text
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    listed = [s for s in statements if s.startswith("select") and "from compositions" in s and "count(" not in s]
    assert listed and all(" limit " in s for s in listed), listed  # one page read, not every row
    names = re.findall(r'href="/admin/playground/\?composition=(combo-\d+)"', first)
    assert names == [f"combo-{i:02d}" for i in range(PAGE_SIZE)]
    assert f"1–{PAGE_SIZE} of {PAGE_SIZE + 2}" in first and 'rel="next"' in first
    second = client.get(f"/admin/compositions/?offset={PAGE_SIZE}").text
    assert re.findall(r"composition=(combo-\d+)", second) == [f"combo-{i:02d}" for i in (PAGE_SIZE, PAGE_SIZE + 1)]
    assert 'rel="prev"' in second and 'rel="next"' not in second

    jobs = client.get("/admin/merges/").text
    assert f"1–{PAGE_SIZE} of {PAGE_SIZE + 3}" in jobs and jobs.count('href="/admin/merges/') == PAGE_SIZE + 1
    assert (
        f"{PAGE_SIZE + 1}–{PAGE_SIZE + 3} of {PAGE_SIZE + 3}" in client.get(f"/admin/merges/?offset={PAGE_SIZE}").text
    )
    done = client.get("/admin/merges/?status=succeeded").text  # the filter is kept by the pager's links
    assert f"of {PAGE_SIZE + 1}" in done and "status=succeeded&amp;offset=20" in done and "broken-" not in done


def test_pickers_past_their_limit_take_typed_slugs(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With more experts than a picker lists: the form says so, and a slug typed beside it works (and a
    wrong one is refused beside the field, by the same service check as the API's)."""
    monkeypatch.setattr(views, "PICKER_LIMIT", 2)
    for i in range(3):
        folder = build_tiny_lora(tiny_base, tmp_path / f"p{i}", seed=50 + i)
        register(registry_env.settings, folder, ExpertSpec(slug=f"pick-{i}", base="tiny-base"))
    sign_in(client, registry_env.admin_key)
    form = client.get("/admin/compositions/new").text
    assert "listing the first 2 of 4 experts" in form and 'value="pick-2"' not in form
    assert 'id="fallback-slugs"' in form  # the fallback is a text input suggesting slugs
    token = _token(form)
    data = {"_csrf_token": token, "name": "far", "router": "direct", "k": "1", "more_experts": "pick-2"}
    resp = client.post("/admin/compositions/new", data={**data, "fallback": "pick-1"})
    assert resp.status_code == 200 and resp.url.path.startswith("/admin/playground"), resp.text[-500:]
    described = client.get("/api/compositions/far", headers=registry_env.admin).json()
    assert described["experts"] == ["pick-2"] and described["fallback"] == "pick-1"
    edit = client.get("/admin/compositions/far/edit").text  # the member past the list stays in the form
    assert re.search(r'id="more_experts"[^>]*value="pick-2"', edit)
    resp = client.post("/admin/compositions/new", data={**data, "name": "nope", "more_experts": "nobody-here"})
    assert resp.status_code == 404 and 'id="experts-error"' in resp.text and "nobody-here" in resp.text

    launcher = client.get("/admin/merges/").text
    assert "listing the first 2 of 4 experts" in launcher
    token = _token(launcher)
    resp = client.post("/admin/merges/", data={"_csrf_token": token, "method": "ties", "more_models": "ghost=0.5"})
    assert resp.status_code in (400, 404) and 'id="models-error"' in resp.text and "ghost" in resp.text
    resp = client.post("/admin/merges/", data={"_csrf_token": token, "method": "ties", "more_models": "pick-2=heavy"})
    assert resp.status_code == 400 and "must be a number" in resp.text
    register_form = client.get("/admin/experts/new").text
    assert 'id="base-slugs"' in register_form and '<option value="tiny-base">' in register_form

    for name in ("more-1", "more-2"):  # three compositions: the playground lists two and takes a typed name
        assert (
            client.post(
                "/api/compositions", json={"name": name, "experts": ["pick-0"]}, headers=registry_env.admin
            ).status_code
            == 201
        )
    playground = client.get("/admin/playground/").text
    assert "listing the first 2 of 3 compositions" in playground and 'value="more-2"' not in playground
    typed = {"_csrf_token": _token(playground), "composition": "", "query": "hi", "max_tokens": "2"}
    resp = client.post("/admin/playground/", data={**typed, "composition_typed": "nothing-named-so"})
    assert resp.status_code == 200 and "nothing-named-so" in resp.text and "listing the first 2" in resp.text


def test_lineage_counts_the_children_it_does_not_draw(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    extra = 3
    for i in range(LINEAGE_CHILDREN + extra):
        folder = build_tiny_lora(tiny_base, tmp_path / f"c{i}", seed=80 + i)
        register(registry_env.settings, folder, ExpertSpec(slug=f"child-{i:02d}", base="tiny-base"))
    sign_in(client, registry_env.admin_key)
    svg = client.get("/admin/experts/tiny-base").text.split('<svg class="lineage"', 1)[1].split("</svg>", 1)[0]
    assert len(re.findall(r'href="/admin/experts/child-\d+"', svg)) == LINEAGE_CHILDREN
    assert f"and {extra} more" in svg


# --- evals, expert edit and delete, dashboard, composition edit, cookies ----------------------------------------


def test_recorded_evals_on_the_eval_page_and_the_card(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
) -> None:
    result = {"task": "arith", "metric": "exact_match", "value": 0.8125, "dataset": "arith-v1", "split": "test"}
    assert client.post("/api/experts/tiny-base/evals", json=result, headers=registry_env.admin).status_code == 201
    sign_in(client, registry_env.admin_key)
    page = client.get("/admin/evals/").text
    table = page.split('id="recorded-evals"', 1)[1].split("</table>", 1)[0]
    assert "tiny-base" in table and "arith-v1" in table and "0.8125" in table and "exact_match" in table
    plots = re.findall(r'<img class="plot" src="([^"]+)"', page)
    assert plots  # the demo's plots are served as PNG images
    resp = client.get(plots[0])
    assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")
    card = client.get("/admin/experts/tiny-base").text.split('id="evals"', 1)[1].split("</table>", 1)[0]
    assert "arith" in card and "0.8125" in card


def test_expert_edit_and_delete_from_the_card(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    register(
        registry_env.settings,
        build_tiny_lora(tiny_base, tmp_path / "e", seed=5),
        ExpertSpec(slug="ed", base="tiny-base"),
    )
    sign_in(client, registry_env.admin_key)
    token = _token(client.get("/admin/experts/ed").text)
    edit = {"_csrf_token": token, "description": "edited", "skills": "a, b", "example_prompts": "one, two\nthree"}
    resp = client.post("/admin/experts/ed/edit", data={**edit, "aliases": "Not An Alias"})
    assert resp.status_code == 400 and 'id="aliases-error"' in resp.text and '<details id="edit" open' in resp.text
    assert client.get("/api/experts/ed", headers=registry_env.admin).json()["description"] != "edited"
    resp = client.post("/admin/experts/ed/edit", data={**edit, "aliases": "ed-alias", "tags": "x"})
    assert resp.status_code == 200 and resp.url.path == "/admin/experts/ed"
    got = client.get("/api/experts/ed-alias", headers=registry_env.admin).json()  # the alias resolves
    assert got["description"] == "edited" and got["tags"] == ["x"]
    assert got["routing"]["skills"] == ["a", "b"] and got["routing"]["example_prompts"] == ["one, two", "three"]

    confirm = client.get("/admin/experts/tiny-base/delete").text
    assert "ed" in confirm.split("Experts built on it", 1)[1]
    resp = client.post("/admin/experts/tiny-base/delete", data={"_csrf_token": token})
    assert resp.status_code == 409 and 'id="delete-error"' in resp.text and "delete those first" in resp.text
    assert client.get("/api/experts/tiny-base", headers=registry_env.admin).status_code == 200
    resp = client.post("/admin/experts/ed/delete", data={"_csrf_token": token})
    assert resp.status_code == 200 and resp.url.path == "/admin/experts/"
    assert client.get("/api/experts/ed", headers=registry_env.admin).status_code == 404


def test_dashboard_engines_show_slugs_and_state(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
) -> None:
    sign_in(client, registry_env.admin_key)
    empty = client.get("/admin/").text
    assert "no model loaded yet" in empty
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body, headers=registry_env.query).status_code == 200
    page = client.get("/admin/").text
    assert "Serving engine: torch" in page
    rows = re.findall(r"<tr>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>", page.split('id="engines"')[1])
    assert ("tiny-base", "loaded", "") in rows, rows
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")
    assert not any(uuid.search(cell) for row in rows for cell in row)


def test_composition_edit_shows_errors_inline(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    body = {"name": "ed", "experts": ["tiny-base"]}
    assert client.post("/api/compositions", json=body, headers=registry_env.admin).status_code == 201
    sign_in(client, registry_env.admin_key)
    form = client.get("/admin/compositions/ed/edit").text
    data = {"_csrf_token": _token(form), "router": "direct", "experts": ["tiny-base"], "description": "kept"}
    resp = client.post("/admin/compositions/ed/edit", data={**data, "router_params": "{not json"})
    assert resp.status_code == 400 and 'id="router_params-error"' in resp.text and "not valid JSON" in resp.text
    assert 'value="kept"' in resp.text  # what was typed stays
    resp = client.post("/admin/compositions/ed/edit", data={**data, "k": "x"})
    assert resp.status_code == 400 and 'id="k-error"' in resp.text
    assert client.get("/api/compositions/ed", headers=registry_env.admin).json()["description"] == ""


@pytest.mark.parametrize("secure", [False, True])
def test_cookies_secure_flag_follows_the_setting(registry_env: RegistryEnv, secure: bool) -> None:
    settings = replace(registry_env.settings, admin_cookie_secure=secure)
    # over https: a client does not send Secure cookies back over http
    with TestClient(create_app(settings, engine=TorchEngine()), base_url="https://testserver.local") as client:
        page = client.get("/admin/login")
        resp = client.post(
            "/admin/login",
            data={"key": registry_env.admin_key, "_csrf_token": _token(page.text)},
            follow_redirects=False,
        )
        cookies = [*page.headers.get_list("set-cookie"), *resp.headers.get_list("set-cookie")]
        for name in ("moerge_csrf", "moerge_admin"):
            [cookie] = [c for c in cookies if c.startswith(f"{name}=")]
            assert ("secure" in cookie.lower().split("; ")) is secure, cookie
    env = {"MOERGE_HOME": str(registry_env.settings.home)}
    assert Settings.from_env(env).admin_cookie_secure is False
    assert Settings.from_env({**env, "MOERGE_ADMIN_COOKIE_SECURE": "1"}).admin_cookie_secure is True


def test_dashboard_shows_running_jobs_of_every_kind_with_a_live_bar(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
) -> None:
    """A `train` job a worker holds (nothing runs it here) is listed first with its bar and its message."""
    import asyncio

    from sqlalchemy import update

    from registry import db
    from registry.jobs import JobService
    from registry.models import Job

    async def running_train_job() -> str:
        engine = db.make_engine(registry_env.settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                job = await JobService(session).submit(
                    "train", "lora-sft", {"config": {}}, result_name="counting-lora", claimed_by="elsewhere:1:ab"
                )
                message = "training: step 30/90, loss 0.412, ~120 s left"
                await session.execute(update(Job).where(Job.id == job.id).values(progress=0.3, message=message))
                await session.commit()
                return str(job.id)
        finally:
            await engine.dispose()

    job_id = asyncio.run(running_train_job())
    sign_in(client, registry_env.admin_key)
    page = client.get("/admin/").text
    jobs = page[page.index('<table class="jobs">') :]
    assert 'aria-label="counting-lora"' in jobs and 'aria-valuenow="30"' in jobs
    assert "<td>train</td>" in jobs and "step 30/90, loss 0.412" in jobs
    page = client.get(f"/admin/merges/{job_id}").text  # its own page, with the live bar and a cancel button
    assert "<h1>Training counting-lora" in page and 'id="cancel">Cancel train<' in page
