"""Nothing registered can stop the server (issue 18, items 2 to 4), on SQLite and PostgreSQL, with tiny real
models: registration refuses ranks, alphas, pattern keys and documents no engine or database can take (a 400
naming the field, nothing left behind); a row that still cannot be served (an older database, a lowered
MOERGE_MAX_LORA_RANK) is reported by `moerge expert verify` and `unservable_adapters`, refused per /v1 request
with the adapter's name and the fix, and never stops an engine from being built; /api/health keeps answering
while a hostile adapter is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import torch
from litestar.testing import TestClient
from safetensors.torch import save_file
from sqlalchemy import Table, update
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app as cli_app
from composition.factory import create_engine, registered_lora_rank
from core.settings import Settings
from registry import db
from registry.limits import unservable_adapters
from registry.models import Expert
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_lora

pytestmark = [
    pytest.mark.parametrize("database_url", BACKENDS, indirect=True),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

HOSTILE_KEY = "(a+)+b"  # against 26 `a`s, today's registration held the whole server 2.3 s per module


def _files(folder: Path, replace: dict[str, bytes] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    replace = replace or {}
    parts = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    parts.update(replace)
    return [("files", (name, data, "application/octet-stream")) for name, data in parts.items()]


def _config_with(folder: Path, **changes: Any) -> dict[str, bytes]:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    return {"adapter_config.json": json.dumps(cfg, allow_nan=True).encode()}


def _state(client: TestClient[Any], env: RegistryEnv) -> tuple[int, int, int, list[Path]]:
    total = client.get("/api/experts", headers=env.query).json()["total"]
    folders = len(list(env.store.experts.iterdir())) if env.store.experts.exists() else 0
    return total, env.store.blob_count(), folders, env.leftovers()


def _refused(resp: httpx.Response, status: int, param: str, *reasons: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for reason in reasons:
        assert reason in error["message"], error
    return error


def _run_db(settings: Settings, work: Any) -> Any:
    async def go() -> Any:
        engine = db.make_engine(settings.database_url)
        try:
            return await work(db.make_sessionmaker(engine))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _set_row(settings: Settings, slug: str, **values: Any) -> None:
    """Write LoRA columns as an older database holds them: straight to the table, past every check."""

    async def work(sessionmaker: Any) -> None:
        async with sessionmaker() as session:
            await session.execute(update(cast(Table, Expert.__table__)).where(Expert.slug == slug).values(**values))
            await session.commit()

    _run_db(settings, work)


# -- registration ------------------------------------------------------------------------------------------


def test_registration_refuses_what_cannot_be_served(
    registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path
) -> None:
    env = registry_env
    adapter_cases: list[tuple[dict[str, bytes], str, str]] = [
        (_config_with(tiny_lora, r=1024), "adapter_config.json:r", "r is 1024, above the largest LoRA rank"),
        (
            _config_with(tiny_lora, rank_pattern={"q_proj": 1024}),
            "adapter_config.json:rank_pattern.q_proj",
            "MOERGE_MAX_LORA_RANK=512",
        ),
        (_config_with(tiny_lora, r=4.0), "adapter_config.json:r", "positive integer, got 4.0"),
        (_config_with(tiny_lora, r=True), "adapter_config.json:r", "positive integer, got True"),
        (_config_with(tiny_lora, lora_alpha=float("nan")), "adapter_config.json:lora_alpha", "got nan"),
        (_config_with(tiny_lora, lora_alpha=0), "adapter_config.json:lora_alpha", "finite positive"),
        (
            _config_with(tiny_lora, alpha_pattern={"q_proj": float("inf")}),
            "adapter_config.json:alpha_pattern.q_proj",
            "finite positive",
        ),
        (
            _config_with(tiny_lora, rank_pattern={HOSTILE_KEY: 4}),
            "adapter_config.json:rank_pattern",
            "'(a+)+b' is not a module name",
        ),
        (
            _config_with(tiny_lora, alpha_pattern={f"m{i}": 8 for i in range(1001)}),
            "adapter_config.json:alpha_pattern",
            "more than 1000",
        ),
        # text no database column holds: a 500 from PostgreSQL (and SQLite) before
        (_config_with(tiny_lora, rank_pattern={"\ud800": 4}), "files[adapter_config.json]", "unpaired surrogate"),
        ({"README.md": b"a card \x00 with a NUL"}, "files[README.md]", "NUL character"),
        ({"README.md": b"---\nlicense: " + b"m" * 100 + b"\n---\n"}, "files[README.md]", "longer than 64"),
        ({"README.md": b"bad \xc3\x28 byte"}, "files[README.md]", "not UTF-8 text"),
        ({"adapter_config.json": b'{"r": "\xff"}'}, "files[adapter_config.json]", "not UTF-8 text"),
        ({"adapter_config.json": b"[" * 100_000 + b"]" * 100_000}, "files[adapter_config.json]", "nested too deeply"),
    ]
    config = (tiny_base / "config.json").read_bytes()
    base_cases: list[tuple[dict[str, bytes], str, str]] = [
        ({"tokenizer.json": b'{"model": "\xff"}'}, "files[tokenizer.json]", "not UTF-8 text"),
        ({"config.json": config.replace(b'"llama"', b'"ll\xffama"')}, "files[config.json]", "not UTF-8 text"),
        (
            {"config.json": config.replace(b'"LlamaForCausalLM"', b'"Llama\\u0000ForCausalLM"')},
            "files[config.json]",
            "NUL character",
        ),
        (
            {"config.json": config.replace(b'"LlamaForCausalLM"', b'"' + b"A" * 300 + b'"')},
            "files[config.json]",
            "longer than 128",
        ),
    ]
    with TestClient(app=create_app(env.settings)) as client:
        resp = client.post("/api/experts", data={"slug": "tiny-base"}, files=_files(tiny_base), headers=env.admin)
        assert resp.status_code == 201, resp.text
        before = _state(client, env)
        for i, (replace, param, reason) in enumerate(adapter_cases):
            resp = client.post(
                "/api/experts",
                data={"slug": f"bad-{i}", "base": "tiny-base"},
                files=_files(tiny_lora, replace),
                headers=env.admin,
            )
            _refused(resp, 400, param, reason)
            assert _state(client, env) == before, param  # nothing half-written
        for i, (replace, param, reason) in enumerate(base_cases):
            resp = client.post(
                "/api/experts", data={"slug": f"bad-base-{i}"}, files=_files(tiny_base, replace), headers=env.admin
            )
            _refused(resp, 400, param, reason)
            assert _state(client, env) == before, param
        resp = client.post(
            "/api/experts", data={"slug": "good", "base": "tiny-base"}, files=_files(tiny_lora), headers=env.admin
        )
        assert resp.status_code == 201, resp.text

    # The limit is the setting's: MOERGE_MAX_LORA_RANK=2 refuses the tiny adapter's r=4.
    with TestClient(app=create_app(dataclasses.replace(env.settings, max_lora_rank=2))) as client:
        before = _state(client, env)
        resp = client.post(
            "/api/experts", data={"slug": "r4", "base": "tiny-base"}, files=_files(tiny_lora), headers=env.admin
        )
        _refused(resp, 400, "adapter_config.json:r", "r is 4", "MOERGE_MAX_LORA_RANK=2")
        assert _state(client, env) == before


# -- rows that cannot be served --------------------------------------------------------------------------


@pytest.fixture
def older_rows(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path, tmp_path: Path) -> RegistryEnv:
    """A base, a servable adapter and two rows as an older database holds them: lora-big declares r=1024,
    lora-regex a rank_pattern key that is a catastrophic regular expression."""
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora-ok", base="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora-big", base="tiny-base"))
    other = build_tiny_lora(tiny_base, tmp_path / "lora-regex", seed=7)
    register(settings, other, ExpertSpec(slug="lora-regex", base="tiny-base"))
    _set_row(settings, "lora-big", r=1024)
    _set_row(settings, "lora-regex", rank_pattern={HOSTILE_KEY: 4})
    return registry_env


def test_unservable_rows_are_listed(older_rows: RegistryEnv) -> None:
    settings = older_rows.settings

    async def listed(sessionmaker: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        async with sessionmaker() as session:
            return await unservable_adapters(session, 512), await unservable_adapters(session, 2)

    at_512, at_2 = _run_db(settings, listed)
    assert [e["slug"] for e in at_512] == ["lora-big", "lora-regex"]
    big, regex = at_512
    assert set(big) == {"slug", "id", "reason", "fix"}
    assert "r is 1024, above the largest LoRA rank served here (MOERGE_MAX_LORA_RANK=512)" in big["reason"]
    assert "re-register it with r and every rank_pattern value <= 512" in big["fix"]
    assert "rank_pattern key '(a+)+b' is not a module name" in regex["reason"]
    assert "adapter_config.json (rank_pattern)" in regex["fix"]
    # A lowered limit: the servable adapter's r=4 is above it too.
    assert [e["slug"] for e in at_2] == ["lora-big", "lora-ok", "lora-regex"]
    assert "raise MOERGE_MAX_LORA_RANK to 4 or more" in at_2[1]["fix"]


def test_unservable_rows_never_stop_an_engine_from_being_built(older_rows: RegistryEnv) -> None:
    """`MOERGE_ENGINE=vllm moerge serve` used to exit at start-up (lora_rank_for(1024) raised). The vLLM engine
    starts its servers lazily: building it starts nothing."""
    settings = dataclasses.replace(older_rows.settings, engine="vllm")

    async def build(sessionmaker: Any) -> tuple[int, int, int]:
        engine = await create_engine(settings, sessionmaker)
        try:
            rank = engine.main.config.max_lora_rank  # type: ignore[attr-defined]
            assert await engine.main.status() == []  # type: ignore[attr-defined]  # no server started
        finally:
            await engine.close()
        return rank, await registered_lora_rank(sessionmaker, 512), await registered_lora_rank(sessionmaker, 2)

    rank, servable, under_two = _run_db(settings, build)
    assert (rank, servable, under_two) == (8, 4, 0)  # only lora-ok's r=4 counts; nothing counts under 2


def _chat(url: str, key: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )


def test_unservable_rows_are_refused_per_request(older_rows: RegistryEnv) -> None:
    env = older_rows
    with serve(env.settings, TorchEngine()) as url:
        error = _refused(
            _chat(url, env.query_key, "lora-big"),
            422,
            "model",
            "adapter 'lora-big' cannot be served: r is 1024",
            "MOERGE_MAX_LORA_RANK=512",
            "re-register it with r and every rank_pattern value <= 512",
        )
        assert error["code"] == "adapter_unservable"
        started = time.perf_counter()
        _refused(
            _chat(url, env.query_key, "lora-regex"),
            422,
            "model",
            "adapter 'lora-regex' cannot be served",
            "'(a+)+b' is not a module name",
            "re-register it",
        )
        assert time.perf_counter() - started < 1
        resp = httpx.post(
            f"{url}/v1/completions",
            headers={"Authorization": f"Bearer {env.query_key}"},
            json={"model": "lora-big", "prompt": "hi", "max_tokens": 2},
            timeout=60,
        )
        _refused(resp, 422, "model", "adapter 'lora-big' cannot be served")
        # a token-level mixture whose second member cannot be served is refused naming that member
        created = httpx.post(
            f"{url}/api/compositions",
            headers=env.admin,
            json={"name": "mix", "router": "arrow", "experts": ["lora-ok", "lora-big"]},
            timeout=120,
        )
        assert created.status_code == 201, created.text
        _refused(_chat(url, env.query_key, "mix"), 422, "model", "adapter 'lora-big' cannot be served")
        # the rest of the registry is served as before
        assert _chat(url, env.query_key, "lora-ok").status_code == 200
        assert _chat(url, env.query_key, "tiny-base").status_code == 200


def test_expert_verify_reports_unservable_rows(
    registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = registry_env.settings
    monkeypatch.setenv("MOERGE_HOME", str(settings.home))
    monkeypatch.setenv("MOERGE_DATABASE_URL", settings.database_url)
    monkeypatch.delenv("MOERGE_MAX_LORA_RANK", raising=False)
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora-a", base="tiny-base"))

    def verify(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli_app, ["expert", "verify", *args])
        return result.exit_code, result.output

    assert verify()[0] == 0
    _set_row(settings, "lora-a", r=1024)
    code, output = verify()
    assert code == 1, output
    assert "UNSERVABLE lora-a: r is 1024, above the largest LoRA rank served here (MOERGE_MAX_LORA_RANK=512)" in output
    assert "fix: re-register it with r and every rank_pattern value <= 512" in output
    assert "ok tiny-base" in output
    assert verify("lora-a")[0] == 1 and verify("tiny-base")[0] == 0

    _set_row(settings, "lora-a", r=4)
    monkeypatch.setenv("MOERGE_MAX_LORA_RANK", "2")  # a lowered limit
    code, output = verify()
    assert code == 1, output
    assert "UNSERVABLE lora-a: r is 4" in output and "raise MOERGE_MAX_LORA_RANK to 4 or more" in output

    monkeypatch.delenv("MOERGE_MAX_LORA_RANK")
    _set_row(settings, "lora-a", rank_pattern={"layers.[0-9]+.q_proj": 4})  # printed as is, not as markup
    code, output = verify()
    assert code == 1 and "rank_pattern key 'layers.[0-9]+.q_proj' is not a module name" in output, output


# -- pattern keys cannot stall anything ------------------------------------------------------------------


def _hostile_adapter(dest: Path, modules: int = 3) -> Path:
    """A LoRA whose rank_pattern key is a catastrophic regular expression and whose module names are what it
    backtracks on: matching `(a+)+b` against `a` * 26 takes seconds, holding the GIL."""
    dest.mkdir()
    tensors = {}
    for i in range(modules):
        name = f"base_model.model.m{i}.{'a' * 26}"
        tensors[f"{name}.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"{name}.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["a" * 26]}
    config["rank_pattern"] = {HOSTILE_KEY: 4}
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture
def live_url(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[str]:
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    with serve(registry_env.settings, TorchEngine()) as url:
        yield url


def test_health_answers_while_a_hostile_adapter_is_refused(
    registry_env: RegistryEnv, live_url: str, tmp_path: Path
) -> None:
    hostile = _hostile_adapter(tmp_path / "hostile")
    outcome: dict[str, httpx.Response] = {}

    def upload() -> None:
        with httpx.Client(timeout=120) as client:
            outcome["resp"] = client.post(
                f"{live_url}/api/experts",
                data={"slug": "hostile", "base": "tiny-base"},
                files=_files(hostile),
                headers=registry_env.admin,
            )

    def timed(client: httpx.Client) -> float:
        started = time.perf_counter()
        resp = client.get(f"{live_url}/api/health")
        elapsed = time.perf_counter() - started
        assert resp.status_code == 200, resp.text
        return elapsed

    with httpx.Client(timeout=30) as client:
        for _ in range(5):  # warm-up: connection, first query
            timed(client)
        thread = threading.Thread(target=upload)
        thread.start()
        during: list[float] = []
        while thread.is_alive() or len(during) < 5:
            during.append(timed(client))
            time.sleep(0.005)
        thread.join()
    _refused(outcome["resp"], 400, "adapter_config.json:rank_pattern", "'(a+)+b' is not a module name")
    assert max(during) < 0.05, f"health took up to {max(during) * 1000:.0f} ms while the upload was refused"
