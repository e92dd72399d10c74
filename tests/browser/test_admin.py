"""The admin panel in a real browser: Playwright drives Debian's chromium (never a downloaded browser)
against a live server (uvicorn in a thread, SQLite, torch engine on tiny models).

Flows: sign in (a query-scope key refused, pages need a session); register an adapter (a pickle checkpoint
refused with the error beside the file field, then a good archive); its card (lineage graph, "try it");
create and edit a composition; a playground query with its score chart, answers and aggregate; launch a
merge, watch it reach 100% and open the merged expert; cancel a second merge queued behind a slow one;
every read-only page without JavaScript; recorded evals and loaded plots; edit and delete an expert; the
four forms by keyboard only. Every page visited is saved as a PNG screenshot, numbered (under pytest's tmp
dir, and under $MOERGE_ARTIFACTS/admin when set).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from registry import db
from registry.schemas import ExpertSpec
from registry.services import ApiKeyService
from serving.torch_engine import TorchEngine
from tests.browser.helpers import tab_to
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_finetune, build_tiny_llama, build_tiny_lora

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000

MATH = ExpertSpec(
    slug="math-lora",
    base="tiny-base",
    task_description="Two-number arithmetic: add, subtract or multiply and give the number.",
    skills=["arithmetic"],
    example_prompts=["What is 12 + 7?", "Compute 45 - 19.", "What is 8 times 6?"],
)
DATES = ExpertSpec(
    slug="dates-lora",
    base="tiny-base",
    task_description="Rewrite a date given in words as an ISO 8601 date (YYYY-MM-DD).",
    skills=["dates"],
    example_prompts=["Convert 3 March 2021 to ISO format.", "Write July 4, 1999 as YYYY-MM-DD."],
)


def _chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium, or run scripts/test.sh)")
    return CHROMIUM


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """save(page, name): a full-page screenshot into the tmp dir and $MOERGE_ARTIFACTS/admin."""
    folders = [tmp_path_factory.mktemp("admin-screenshots")]
    if artifacts := os.environ.get("MOERGE_ARTIFACTS"):
        folders.append(Path(artifacts) / "admin")
        folders[-1].mkdir(parents=True, exist_ok=True)
    prefixes: set[str] = set()

    def save(page: Any, name: str) -> None:
        prefix = name.split("-", 1)[0]
        assert prefix not in prefixes, f"two screenshots numbered {prefix}"  # one number, one page
        prefixes.add(prefix)
        png = page.screenshot(full_page=True)
        for folder in folders:
            (folder / f"{name}.png").write_bytes(png)

    yield save


@pytest.fixture(scope="module")
def live(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with a tiny base, two routed LoRAs, two finetunes (fast merges) and a bigger base with two
    finetunes (a merge slow enough to queue another behind it); an admin and a query key."""
    _chromium()
    root = tmp_path_factory.mktemp("admin-live")
    imports = root / "imports"
    imports.mkdir()
    url = f"sqlite+aiosqlite:///{root / 'moerge.db'}"
    settings = Settings(
        home=root / "home",
        database_url=url,
        import_roots=(imports.resolve(),),
        max_upload_bytes=256 * 1024 * 1024,
        max_unpacked_bytes=256 * 1024 * 1024,
        engine="torch",
    )
    db.upgrade(url)

    async def keys() -> tuple[str, str]:
        engine = db.make_engine(url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                _, admin = await ApiKeyService(session).create("admin", ["admin", "query"])
                _, query = await ApiKeyService(session).create("reader", ["query"])
                return admin, query
        finally:
            await engine.dispose()

    admin_key, query_key = asyncio.run(keys())
    models = root / "models"
    register(settings, tiny_base, ExpertSpec(slug="tiny-base", task_description="General chat."))
    register(settings, build_tiny_lora(tiny_base, models / "math", seed=20), MATH)
    register(settings, build_tiny_lora(tiny_base, models / "dates", seed=21), DATES)
    for i in (1, 2):
        folder = build_tiny_finetune(tiny_base, models / f"ft-{i}", seed=i)
        register(settings, folder, ExpertSpec(slug=f"ft-{i}", base="tiny-base"))
    spare = ExpertSpec(slug="spare-lora", base="tiny-base", skills=["spare"])  # edited, then deleted
    register(settings, build_tiny_lora(tiny_base, models / "spare", seed=22), spare)
    # what the keyboard registers by import (a file chooser is not a keyboard's)
    build_tiny_lora(tiny_base, imports / "kbd-lora", seed=31)
    big = build_tiny_llama(models / "big-base", hidden_size=512, intermediate_size=2048, num_layers=8, seed=9)
    register(settings, big, ExpertSpec(slug="big-base"))
    for i in (1, 2, 3):
        folder = build_tiny_finetune(big, models / f"big-ft-{i}", seed=10 + i)
        register(settings, folder, ExpertSpec(slug=f"big-ft-{i}", base="big-base"))
    # the adapter the registration form uploads, as an archive; and a bad one holding a pickle checkpoint
    web = build_tiny_lora(tiny_base, models / "web-lora", seed=30)
    good = root / "web-lora.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(web, arcname="web-lora")
    bad_dir = root / "bad-lora"
    shutil.copytree(web, bad_dir)
    for weights in bad_dir.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    bad = root / "bad-lora.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(bad_dir, arcname="bad-lora")
    with serve(settings, TorchEngine()) as base_url:
        yield {
            "url": base_url,
            "admin_key": admin_key,
            "query_key": query_key,
            "good_archive": good,
            "bad_archive": bad,
            "imports": imports,
        }


@pytest.fixture(scope="module")
def browser(live: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(_chromium()), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Any, live: dict[str, Any], key: str) -> None:
    page.goto(f"{live['url']}/admin/login")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_label("Admin API key").press("Enter")  # the keyboard submits the form
    page.wait_for_load_state()


@pytest.fixture
def page(browser: Any, live: dict[str, Any]) -> Iterator[Any]:
    """A fresh browser context, signed in with the admin key."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    sign_in(page, live, live["admin_key"])
    assert page.url.rstrip("/").endswith("/admin"), page.url
    try:
        yield page
    finally:
        context.close()


def test_sign_in_refuses_query_key_and_guards_pages(browser: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(f"{live['url']}/admin/experts/")  # no session: to the sign-in page, and back afterwards
        assert "/admin/login" in page.url
        shots(page, "01-sign-in")
        sign_in(page, live, live["query_key"])
        expect(page.locator("#key-error")).to_contain_text("no admin scope")
        shots(page, "02-sign-in-query-key-refused")
        page.goto(f"{live['url']}/admin/")
        assert "/admin/login" in page.url  # the refused key left no session
        sign_in(page, live, live["admin_key"])
        assert page.url.rstrip("/").endswith("/admin"), page.url
        expect(page.locator("#counts")).to_contain_text("adapter")
        expect(page.locator("#counts")).to_contain_text("base")
        shots(page, "03-dashboard")
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["moerge_admin"]["httpOnly"] and cookies["moerge_admin"]["sameSite"] == "Lax"
        assert live["admin_key"] not in cookies["moerge_admin"]["value"]
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(re.compile(r".*/admin/login"))
        page.goto(f"{live['url']}/admin/")
        assert "/admin/login" in page.url
    finally:
        context.close()


def test_register_adapter_inline_error_then_card(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{live['url']}/admin/experts/new")
    shots(page, "04-register-form")

    def fill(slug: str, archive: Path) -> None:
        page.get_by_label("Slug", exact=True).fill(slug)
        page.get_by_label("Base model (slug)").fill("tiny-base")
        page.get_by_label("Description", exact=True).fill("an adapter registered from the browser")
        page.get_by_label("Skills (comma-separated)").fill("web, browsing")
        page.locator("#archive").set_input_files(str(archive))
        page.get_by_role("button", name="Register").click()
        page.wait_for_load_state()

    fill("web-lora", live["bad_archive"])
    error = page.locator("#archive-error")  # beside the file field, not above the form
    expect(error).to_contain_text("pickle checkpoints are refused")
    assert page.locator(".field.invalid #archive").count() == 1
    expect(page.get_by_label("Slug", exact=True)).to_have_value("web-lora")  # what was typed is kept
    shots(page, "05-register-inline-error")

    fill("web-lora", live["good_archive"])
    page.wait_for_url(re.compile(r".*/admin/experts/web-lora$"))
    expect(page.locator("h1")).to_contain_text("web-lora")
    lineage = page.locator("svg.lineage")
    expect(lineage).to_contain_text("tiny-base")
    expect(lineage).to_contain_text("web-lora")
    expect(page.locator("#fields")).to_contain_text("web, browsing")
    expect(page.locator(".model-card")).to_be_visible()
    page.get_by_label("Message to web-lora").fill("hello")
    page.get_by_role("button", name="Ask").click()
    expect(page.locator("#try-answer [data-testid=answer]")).to_be_visible()
    expect(page.locator("#try-answer")).to_contain_text("answered by web-lora")
    assert "/try" not in page.url  # HTMX swapped the answer in; the page stayed
    shots(page, "06-expert-card")

    page.goto(f"{live['url']}/admin/experts/?kind=adapter&q=web")
    expect(page.locator("#experts tbody tr")).to_have_count(1)
    shots(page, "07-experts-filtered")


def test_composition_and_playground(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{live['url']}/admin/compositions/new")
    page.get_by_label("Name", exact=True).fill("browser-combo")
    page.get_by_label("Router", exact=True).select_option("embedding")
    page.get_by_label("Router parameters (JSON object)").fill('{"threshold": 3}')
    page.get_by_label("math-lora").check()
    page.get_by_label("dates-lora").check()
    page.get_by_label("k (experts that answer)").fill("2")
    page.get_by_label("Aggregator (for k > 1)").select_option("vote")
    page.get_by_role("button", name="Create").click()
    page.wait_for_load_state()
    expect(page.locator("#router_params-error")).to_be_visible()  # the router's own check, beside the field
    shots(page, "08-composition-inline-error")
    page.get_by_label("Router parameters (JSON object)").fill('{"threshold": -1.0}')
    page.get_by_role("button", name="Create").click()
    page.wait_for_url(re.compile(r".*/admin/playground.*composition=browser-combo"))

    page.goto(f"{live['url']}/admin/compositions/")
    expect(page.locator("#compositions")).to_contain_text("browser-combo")
    shots(page, "09-compositions")

    page.goto(f"{live['url']}/admin/playground/?composition=browser-combo")
    page.get_by_label("Query").fill("What is 17 + 25?")
    page.get_by_role("button", name="Send").click()
    chart = page.locator("#chart")
    expect(chart.locator(".bar-row")).to_have_count(2)
    expect(chart.locator(".bar.chosen")).to_have_count(2)
    expect(chart).to_contain_text("math-lora")
    expect(page.locator(".expert-answer")).to_have_count(2)
    expect(page.locator("#aggregate")).to_be_visible()
    expect(page.locator("#result")).to_contain_text("Routed to: math-lora")
    shots(page, "10-playground")

    # edit (a refusal beside its field first), then delete
    page.goto(f"{live['url']}/admin/compositions/browser-combo/edit")
    page.get_by_label("Router parameters (JSON object)").fill("{oops")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#router_params-error")).to_contain_text("not valid JSON")
    page.get_by_label("Router parameters (JSON object)").fill('{"threshold": -1.0}')
    page.get_by_label("Description", exact=True).fill("edited in the browser")
    shots(page, "11-composition-edit")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(r".*/admin/compositions/?$"))
    expect(page.locator("#compositions")).to_contain_text("edited in the browser")
    page.get_by_role("button", name="Delete browser-combo").click()
    page.wait_for_url(re.compile(r".*/admin/compositions/?$"))
    expect(page.locator("#compositions")).not_to_contain_text("browser-combo")


def _launch(page: Any, live: dict[str, Any], name: str, base: str, models: list[str]) -> None:
    page.goto(f"{live['url']}/admin/merges/")
    page.get_by_label("Method", exact=True).select_option("ties")
    page.get_by_label("Base model (slug)").fill(base)
    for slug in models:
        page.get_by_label(slug, exact=True).check()
        page.get_by_label(f"weight of {slug}").fill("0.5")
    page.get_by_label(re.compile("^Per-model parameters")).fill('{"density": 0.5}')
    page.get_by_label(re.compile("^Name of the merged expert")).fill(name)
    page.get_by_role("button", name="Launch merge").click()
    page.wait_for_url(re.compile(r".*/admin/merges/[0-9a-f-]{36}$"))


def test_merge_progress_to_result(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{live['url']}/admin/merges/")
    shots(page, "12-merge-launcher")
    _launch(page, live, "browser-ties", "tiny-base", ["ft-1", "ft-2"])
    expect(page.locator("#job-status")).to_have_text("succeeded")  # HTMX polls the progress fragment
    expect(page.locator("#job-percent")).to_have_text("100%")
    shots(page, "13-merge-done")
    page.locator("#result-link").click()
    page.wait_for_url(re.compile(r".*/admin/experts/browser-ties$"))
    expect(page.locator("svg.lineage")).to_contain_text("ft-1")
    expect(page.locator("svg.lineage")).to_contain_text("ft-2")
    shots(page, "14-merged-expert")

    page.goto(f"{live['url']}/admin/")
    expect(page.locator("body")).to_contain_text("browser-ties")


def test_open_dashboard_shows_a_new_merge_without_a_reload(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    dashboard = page.context.new_page()  # a second tab, signed in through the same session cookie
    dashboard.goto(f"{live['url']}/admin/")
    expect(dashboard.locator("#live")).not_to_contain_text("browser-watched")
    navigations: list[str] = []
    dashboard.on("framenavigated", lambda frame: navigations.append(frame.url))
    _launch(page, live, "browser-watched", "tiny-base", ["ft-1", "ft-2"])
    expect(dashboard.locator("#live")).to_contain_text("browser-watched", timeout=20_000)  # HTMX polls the page
    assert navigations == []  # swapped in place, not reloaded
    shots(dashboard, "15-dashboard-refreshed")
    dashboard.close()


def test_cancel_a_merge(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    _launch(page, live, "browser-slow", "big-base", ["big-ft-1", "big-ft-2", "big-ft-3"])
    slow = page.url
    expect(page.locator("#job-status")).to_have_text(re.compile("queued|running"))
    shots(page, "16-merge-running")
    _launch(page, live, "browser-cancelled", "big-base", ["big-ft-1", "big-ft-2"])  # queued behind it
    expect(page.locator("#job-status")).to_have_text(re.compile("queued|running"))
    page.get_by_role("button", name="Cancel merge").click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator("#result-link")).to_have_count(0)
    shots(page, "17-merge-cancelled")
    page.goto(slow)  # the first one is unaffected
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
    page.goto(f"{live['url']}/admin/merges/")
    expect(page.locator("table").last).to_contain_text("browser-cancelled")
    expect(page.locator("table").last).to_contain_text("browser-slow")
    shots(page, "18-merges-list")


def _api(live: dict[str, Any], method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A JSON API call with the admin key (test data the panel then shows)."""
    import httpx

    headers = {"Authorization": f"Bearer {live['admin_key']}"}
    resp = httpx.request(method, f"{live['url']}{path}", json=body, headers=headers, timeout=60)
    assert resp.status_code in (200, 201), resp.text
    return dict(resp.json())


def test_pages_render_without_javascript(browser: Any, live: dict[str, Any], shots: Any) -> None:
    """Every read-only page, JavaScript off: its key element is there (and the "try it" box works)."""
    from playwright.sync_api import expect

    _api(live, "POST", "/api/compositions", {"name": "nojs-combo", "experts": ["math-lora"]})
    models = [{"model": slug, "parameters": {"weight": 0.5, "density": 0.5}} for slug in ("ft-1", "ft-2")]
    merge = {"merge_method": "ties", "base_model": "tiny-base", "models": models, "name": "nojs-merged"}
    job = _api(live, "POST", "/api/merges", merge)["id"]
    context = browser.new_context(java_script_enabled=False)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    url = live["url"]
    pages = [  # (path, what must render, its text, screenshot)
        ("/admin/", "#counts", "adapter", "19-no-js-dashboard"),
        ("/admin/experts/", "#experts", "math-lora", "20-no-js-experts"),
        ("/admin/experts/math-lora", "svg.lineage", "tiny-base", "21-no-js-expert-card"),
        ("/admin/compositions/", "#compositions", "nojs-combo", "22-no-js-compositions"),
        ("/admin/compositions/nojs-combo/edit", "form.stack", "Candidate experts", "23-no-js-composition-edit"),
        ("/admin/merges/", "#launcher", "Launch merge", "24-no-js-merges"),
        (f"/admin/merges/{job}", "#job-status", "", "25-no-js-merge-job"),
        ("/admin/evals/", "#recorded-evals", "expert", "26-no-js-evals"),
        ("/admin/playground/?composition=nojs-combo", "#composition", "nojs-combo", "27-no-js-playground"),
    ]
    try:
        sign_in(page, live, live["admin_key"])  # a plain form post
        for path, selector, text, shot in pages:
            page.goto(f"{url}{path}")
            expect(page.locator(selector).first).to_be_visible()
            if text:
                expect(page.locator(selector).first).to_contain_text(text)
            shots(page, shot)
        expect(page.locator("#composition option:checked")).to_have_text("nojs-combo")
        page.goto(f"{url}/admin/experts/math-lora")
        page.get_by_label("Message to math-lora").fill("What is 2 + 2?")  # a plain form post: the whole card
        page.get_by_role("button", name="Ask").click()
        expect(page.locator("#try-answer")).to_contain_text("answered by math-lora")
        expect(page.locator("svg.lineage")).to_be_visible()
    finally:
        context.close()


def test_evals_show_recorded_results_and_plots(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    result = {"task": "browser-arith", "metric": "exact_match", "value": 0.625, "dataset": "arith-v2"}
    _api(live, "POST", "/api/experts/math-lora/evals", result)
    page.goto(f"{live['url']}/admin/evals/")
    recorded = page.locator("#recorded-evals")
    expect(recorded).to_contain_text("browser-arith")
    expect(recorded.locator("tr", has_text="browser-arith")).to_contain_text("math-lora")
    plots = page.locator("img.plot")
    assert plots.count() > 0
    page.wait_for_function("() => [...document.querySelectorAll('img.plot')].every(i => i.complete)")
    widths = plots.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths), widths  # every plot loaded as an image
    shots(page, "28-evals")
    page.goto(f"{live['url']}/admin/experts/math-lora")
    expect(page.locator("#evals")).to_contain_text("browser-arith")
    expect(page.locator("#evals")).to_contain_text("0.625")


def test_edit_and_delete_an_expert(page: Any, live: dict[str, Any], shots: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{live['url']}/admin/experts/spare-lora")
    page.locator("#edit summary").click()
    edit = page.locator("#edit")
    edit.get_by_label("Description", exact=True).fill("edited from the card")
    edit.get_by_label("Tags (comma-separated)").fill("edited, browser")
    edit.get_by_label("Aliases (comma-separated)").fill("Bad Alias")
    edit.get_by_role("button", name="Save changes").click()
    expect(page.locator("#aliases-error")).to_be_visible()  # refused beside the field, the form kept open
    page.locator("#edit").get_by_label("Aliases (comma-separated)").fill("spare")
    page.locator("#edit").get_by_role("button", name="Save changes").click()
    page.wait_for_url(re.compile(r".*/admin/experts/spare-lora$"))
    expect(page.locator("#fields")).to_contain_text("edited, browser")
    expect(page.locator("#fields")).to_contain_text("spare")
    expect(page.locator("p", has_text="edited from the card").first).to_be_visible()
    shots(page, "29-expert-edited")

    page.goto(f"{live['url']}/admin/experts/tiny-base/delete")  # experts are built on it: refused
    page.get_by_role("button", name="Delete tiny-base").click()
    expect(page.locator("#delete-error")).to_contain_text("delete those first")
    shots(page, "30-expert-delete-refused")

    page.goto(f"{live['url']}/admin/experts/spare-lora")
    page.locator("#delete-link").click()
    page.get_by_role("button", name="Delete spare-lora").click()
    page.wait_for_url(re.compile(r".*/admin/experts/?$"))
    expect(page.locator("#experts")).not_to_contain_text("spare-lora")
    page.goto(f"{live['url']}/admin/experts/spare-lora")
    expect(page.locator(".banner")).to_contain_text("no expert named")
    shots(page, "31-error-page")


def test_forms_by_keyboard_only(page: Any, live: dict[str, Any], shots: Any) -> None:
    """Register (import), a composition, the playground and a merge: focus by Tab, type, Space, Enter."""
    from playwright.sync_api import expect

    keys = page.keyboard
    page.goto(f"{live['url']}/admin/experts/new")
    tab_to(page, "input[name=mode]:checked")
    keys.press("ArrowDown")  # the radio group: import a folder on the server
    tab_to(page, "#path")
    keys.type(str(live["imports"] / "kbd-lora"))
    tab_to(page, "#slug")
    keys.type("kbd-lora")
    tab_to(page, "#base")
    keys.type("tiny-base")
    tab_to(page, "#skills")
    keys.type("keyboard, typing")
    tab_to(page, "form[action='/admin/experts/new'] button[type=submit]")
    keys.press("Enter")
    page.wait_for_url(re.compile(r".*/admin/experts/kbd-lora$"))
    expect(page.locator("#fields")).to_contain_text("keyboard, typing")
    shots(page, "32-keyboard-registered")

    page.goto(f"{live['url']}/admin/compositions/new")
    tab_to(page, "#name")
    keys.type("kbd-combo")
    tab_to(page, "#router_params")
    keys.type('{"threshold": -1.0}')
    tab_to(page, "input[name=experts][value=kbd-lora]")
    keys.press("Space")
    tab_to(page, "input[name=experts][value=math-lora]")
    keys.press("Space")
    tab_to(page, "form.stack button[type=submit]")
    keys.press("Enter")
    page.wait_for_url(re.compile(r".*/admin/playground.*composition=kbd-combo"))

    tab_to(page, "#query")  # the playground, with the new composition chosen
    keys.type("What is 3 + 4?")
    tab_to(page, "form.stack button[type=submit]")
    keys.press("Enter")
    expect(page.locator("#chart .bar-row")).to_have_count(2)
    expect(page.locator("#chart")).to_contain_text("kbd-lora")
    expect(page.locator("#aggregate")).to_be_visible()
    shots(page, "33-keyboard-playground")

    page.goto(f"{live['url']}/admin/merges/")
    tab_to(page, "#base_model")
    keys.type("tiny-base")
    for slug in ("ft-1", "ft-2"):
        tab_to(page, f"input[name=models][value={slug}]")
        keys.press("Space")
        tab_to(page, f"input[name='weight:{slug}']")
        keys.type("0.5")
    tab_to(page, "#model_parameters")
    keys.type('{"density": 0.5}')
    tab_to(page, "#name")
    keys.type("kbd-merged")
    tab_to(page, "#launcher button[type=submit]")
    keys.press("Enter")
    page.wait_for_url(re.compile(r".*/admin/merges/[0-9a-f-]{36}$"))
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#result-link")).to_have_text("kbd-merged")
    shots(page, "34-keyboard-merge")


def test_csrf_and_session_required_outside_the_browser(live: dict[str, Any]) -> None:
    """Forms without the CSRF token are refused; the panel's actions need a session, not a Bearer key."""
    import httpx

    with httpx.Client(base_url=live["url"], timeout=30) as http:
        resp = http.post("/admin/login", data={"key": live["admin_key"]})
        assert resp.status_code == 403 and "CSRF" in resp.text
        resp = http.get("/admin/experts/", headers={"Authorization": f"Bearer {live['admin_key']}"})
        assert resp.status_code == 303 and resp.headers["location"].startswith("/admin/login")
        form = http.get("/admin/login")
        token = re.search(r'name="_csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        # a forged cross-site form would not know the token; with it but without a session:
        resp = http.post("/admin/merges/", data={"_csrf_token": token.group(1)})
        assert resp.status_code == 303 and resp.headers["location"].startswith("/admin/login")
