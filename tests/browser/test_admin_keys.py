"""The admin panel's API keys page in a real browser (Debian's chromium through Playwright, the fixtures of
test_admin.py) against a live server, and the keys it makes checked through HTTP against the same server.

Flow: open Keys from the nav; create a key by keyboard (a name, the query scope, one allowed model, a
requests-per-minute limit, a duration); its secret is shown once and gone on reload; the list shows its prefix,
status and limits; the secret lists only its model, is refused another model, the admin scope and the request
past its limit; rotate it (the old secret refused within a second) and revoke the new one. And refusals: a
limit of 0 stopped by the browser, a limit too large and a bad duration refused beside their fields, nothing
created. Screenshots 40 to 49 (test_admin.py numbers 01 to 34), in the same folders.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from registry import db
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.browser.helpers import tab_to
from tests.browser.test_admin import browser, page, shots  # noqa: F401 (fixtures)
from tests.fixtures.db import make_keys
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_lora

pytestmark = pytest.mark.browser

NAME = "browser-reader"
RPM = 4
SECRET = re.compile(r"mk-[A-Za-z0-9_-]{40,}")
REVOKED_WITHIN_S = 1.5


@pytest.fixture(scope="module")
def live(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with a base and two adapters (one to allow, one to refuse) and an admin key; the browser and
    page fixtures of test_admin.py run against it."""
    root = tmp_path_factory.mktemp("keys-live")
    url = f"sqlite+aiosqlite:///{root / 'moerge.db'}"
    settings = Settings(home=root / "home", database_url=url, import_roots=(), engine="torch")
    db.upgrade(url)
    admin_key, _ = make_keys(url)
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    for seed, slug in ((40, "math-lora"), (41, "dates-lora")):
        register(settings, build_tiny_lora(tiny_base, root / slug, seed=seed), ExpertSpec(slug=slug, base="tiny-base"))
    with serve(settings, TorchEngine()) as base_url:
        yield {"url": base_url, "admin_key": admin_key}


def _error(resp: httpx.Response, status: int, param: str) -> dict[str, Any]:
    """The OpenAI-shaped error of a refused request, checked for its status and the field it names."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = dict(resp.json()["error"])
    assert set(error) >= {"message", "type", "param", "code"} and error["param"] == param, error
    return error


def _refused_within(live: dict[str, Any], secret: str) -> dict[str, Any]:
    """Poll /v1/models with ``secret`` until it is refused; fails past REVOKED_WITHIN_S."""
    deadline = time.monotonic() + REVOKED_WITHIN_S
    while True:
        resp = httpx.get(f"{live['url']}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
        if resp.status_code != 200 or time.monotonic() > deadline:
            return _error(resp, 401, "authorization")
        time.sleep(0.1)


def _models(live: dict[str, Any], secret: str) -> list[str]:
    resp = httpx.get(f"{live['url']}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return [m["id"] for m in resp.json()["data"]]


def _api_keys(live: dict[str, Any]) -> list[dict[str, Any]]:
    """Every key (revoked ones too) as the admin API lists them."""
    headers = {"Authorization": f"Bearer {live['admin_key']}"}
    resp = httpx.get(f"{live['url']}/api/keys", params={"limit": 500}, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


def _new_secret(tab: Any) -> str:
    """The secret the page shows once, with the prefix it names beside it."""
    shown = tab.locator("#new-key-secret").inner_text().strip()
    assert SECRET.fullmatch(shown), shown
    assert f"{shown[:10]}…" in tab.locator("#new-key").inner_text()
    return str(shown)


def _start_of_a_minute() -> None:
    """Wait for the next clock minute when this one is nearly over: per-minute counts restart on the minute."""
    into = time.time() % 60
    if into > 40:
        time.sleep(60 - into + 0.2)


def test_key_lifecycle(page: Any, live: dict[str, Any], shots: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    page.get_by_role("navigation", name="main").get_by_role("link", name="Keys").click()
    page.wait_for_url(re.compile(r".*/admin/keys/$"))
    expect(page.locator("#keys tbody")).to_contain_text("admin")
    shots(page, "40-keys")

    # create, by keyboard only; the query scope is ticked by default, admin is not
    keys = page.keyboard
    tab_to(page, "#name")
    keys.type(NAME)
    tab_to(page, "input[name=scopes][value=query]")
    assert page.locator("input[name=scopes][value=query]").is_checked()
    tab_to(page, "input[name=scopes][value=admin]")
    assert not page.locator("input[name=scopes][value=admin]").is_checked()
    tab_to(page, "#models")
    keys.type("math-lora")
    tab_to(page, "#rpm_limit")
    keys.type(str(RPM))
    tab_to(page, "#duration")
    keys.type("30d")
    tab_to(page, "#create-key button[type=submit]")
    before = datetime.now(UTC)
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/admin/keys/")) as posted:
        keys.press("Enter")
    assert posted.value.status == 201
    assert posted.value.headers["cache-control"] == "no-store"  # the page with the secret is cached nowhere
    page.wait_for_load_state()
    secret = _new_secret(page)
    prefix = secret[:10]
    expect(page.locator("#new-key")).to_contain_text(f"New key for {NAME}")
    expect(page.locator("#name")).to_have_value("")  # the form is empty again, ready for another key
    shots(page, "41-key-created-secret-shown-once")

    # shown once: loaded again, the page holds no trace of it, and the key was made once
    page.reload()
    page.wait_for_load_state()
    expect(page.locator("#new-key")).to_have_count(0)
    assert secret not in page.content()
    assert [k["prefix"] for k in _api_keys(live) if k["name"] == NAME] == [prefix]
    row = page.locator("#keys tbody tr", has_text=prefix)
    expect(row).to_have_count(1)
    cells = row.locator("td")
    expect(cells.nth(0)).to_contain_text(NAME)
    expect(cells.nth(1)).to_have_text(f"{prefix}…")
    expect(cells.nth(2)).to_have_text("query")
    expect(cells.nth(3)).to_have_text("active")
    # 30 days from the creation (either side of midnight UTC)
    days = {f"{(t + timedelta(days=30)):%Y-%m-%d}" for t in (before, datetime.now(UTC))}
    assert any(day in cells.nth(4).inner_text() for day in days), (cells.nth(4).inner_text(), days)
    expect(cells.nth(5)).to_have_text("math-lora")
    expect(cells.nth(6)).to_have_text(f"{RPM} req/min")
    expect(cells.nth(7)).to_contain_text("0 requests")
    shots(page, "42-key-listed-secret-gone")

    # the secret works, for its one model and its scope, up to its limit
    _start_of_a_minute()
    bearer = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=live["url"], headers=bearer, timeout=60) as http:
        error = _error(http.get("/api/keys"), 403, "authorization")  # the admin scope: refused, not counted
        assert error["code"] == "insufficient_scope"
        assert _models(live, secret) == ["math-lora"]  # 1 (three experts are registered)
        chat = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 3}
        error = _error(http.post("/v1/chat/completions", json={**chat, "model": "dates-lora"}), 403, "model")  # 2
        assert error["code"] == "model_not_allowed"
        answered = http.post("/v1/chat/completions", json={**chat, "model": "math-lora"})  # 3
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["total_tokens"] > 0
        assert _models(live, secret) == ["math-lora"]  # 4
        limited = http.get("/v1/models")  # 5: past the limit
        assert _error(limited, 429, "rpm_limit")["code"] == "rpm_limit_exceeded"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
    page.reload()
    row = page.locator("#keys tbody tr", has_text=prefix)
    expect(row.locator("td").nth(7)).to_contain_text(re.compile(rf"^\s*{RPM} requests, [1-9]\d* tokens"))
    expect(row.locator("td").nth(8)).to_contain_text(" UTC")  # last used
    shots(page, "43-key-usage")

    # rotate: a new secret shown once, the same settings, the old secret refused at once
    page.on("dialog", lambda dialog: dialog.accept())  # should the page ask to confirm
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name=f"Rotate {NAME} ({prefix})").click()
    assert posted.value.headers["cache-control"] == "no-store"
    page.wait_for_load_state()
    rotated = _new_secret(page)
    assert rotated != secret
    new_prefix = rotated[:10]
    expect(page.locator("#notice")).to_contain_text("the old key is revoked")
    assert _refused_within(live, secret)["code"] == "revoked_api_key"
    assert _models(live, rotated) == ["math-lora"]
    expect(page.locator("#keys tbody tr", has_text=prefix)).to_have_count(0)  # revoked keys are hidden
    row = page.locator("#keys tbody tr", has_text=new_prefix)
    expect(row.locator("td").nth(3)).to_have_text("active")
    expect(row.locator("td").nth(5)).to_have_text("math-lora")
    expect(row.locator("td").nth(6)).to_have_text(f"{RPM} req/min")
    shots(page, "44-key-rotated")
    # away and back again (the page answered a POST to /admin/keys/rotate): the list, without the secret
    page.get_by_role("navigation", name="main").get_by_role("link", name="Dashboard").click()
    page.wait_for_url(re.compile(r".*/admin/$"))
    page.go_back()
    page.wait_for_url(re.compile(r".*/admin/keys/$"))
    expect(page.locator("#keys")).to_contain_text(new_prefix)
    assert rotated not in page.content() and secret not in page.content()
    page.reload()
    page.wait_for_load_state()
    assert rotated not in page.content()

    # revoke the new one: gone from the list of live keys, shown revoked with the revoked ones, refused
    page.get_by_role("button", name=f"Revoke {NAME} ({new_prefix})").click()
    page.wait_for_load_state()
    expect(page.locator("#notice")).to_contain_text(f"revoked {NAME} ({new_prefix}…)")
    expect(page.locator("#keys tbody tr", has_text=new_prefix)).to_have_count(0)
    assert _refused_within(live, rotated)["code"] == "revoked_api_key"
    page.get_by_label("show revoked keys").check()
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r".*/admin/keys/\?revoked=1$"))
    for shown in (prefix, new_prefix):
        row = page.locator("#keys tbody tr", has_text=shown)
        expect(row.locator("td").nth(3)).to_have_text("revoked")
        expect(row.get_by_role("button")).to_have_count(0)  # nothing left to rotate or revoke
    shots(page, "45-key-revoked")
    assert {k["status"] for k in _api_keys(live) if k["name"] == NAME} == {"revoked"}


def test_key_form_refusals(page: Any, live: dict[str, Any], shots: Any) -> None:  # noqa: F811
    """Each refusal beside its field, what was typed kept, no key made."""
    from playwright.sync_api import expect

    page.goto(f"{live['url']}/admin/keys/")
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.get_by_label("Name", exact=True).fill("refused-key")
    page.get_by_label("Models it may use (names, comma-separated)").fill("math-lora")

    # 0 requests a minute: the browser's own check stops the form (the field says min 1)
    page.get_by_label("Requests per minute").fill("0")
    page.get_by_role("button", name="Create key").click()
    assert page.locator("#rpm_limit").evaluate("e => e.validity.rangeUnderflow")
    assert page.evaluate("() => document.activeElement.id") == "rpm_limit"
    page.wait_for_timeout(300)
    assert posts == []
    shots(page, "46-key-refused-by-the-browser")

    def refused(field: str, message: str, shot: str) -> None:
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            page.get_by_role("button", name="Create key").click()
        assert posted.value.status == 400
        page.wait_for_load_state()
        expect(page.locator(f"#{field}-error")).to_contain_text(message)
        expect(page.locator(f".field.invalid #{field}")).to_have_count(1)
        expect(page.locator(f"#{field}")).to_have_attribute("aria-describedby", f"{field}-error")
        expect(page.locator(".field.invalid")).to_have_count(1)  # only that field
        expect(page.get_by_label("Name", exact=True)).to_have_value("refused-key")  # what was typed is kept
        expect(page.get_by_label("Models it may use (names, comma-separated)")).to_have_value("math-lora")
        expect(page.locator("#new-key")).to_have_count(0)
        shots(page, shot)

    # past what the server takes (the browser has no maximum to check)
    page.get_by_label("Requests per minute").fill(str(10**16))
    refused("rpm_limit", "rpm_limit must be between 1 and", "47-key-limit-refused")
    page.get_by_label("Requests per minute").fill("5")
    page.get_by_label("Expires after").fill("3 months")
    refused("duration", "duration must be a number and a unit", "48-key-duration-refused")
    expect(page.get_by_label("Requests per minute")).to_have_value("5")
    page.get_by_label("Expires after").fill("0d")
    refused("duration", "more than 0", "49-key-zero-duration-refused")
    # what no browser sends but a script may: digits int() refuses, and more of them than it parses
    token = page.locator("#create-key input[name=_csrf_token]").get_attribute("value")
    for typed in ("²", "9" * 5000):
        form = {"_csrf_token": str(token), "name": "refused-key", "scopes": "query", "rpm_limit": typed}
        resp = page.request.post(f"{live['url']}/admin/keys/", form=form)
        assert resp.status == 400, (typed[:10], resp.status)
        assert 'id="rpm_limit-error"' in resp.text()
    expect(page.locator("#keys")).not_to_contain_text("refused-key")
    assert [k for k in _api_keys(live) if k["name"] == "refused-key"] == []
