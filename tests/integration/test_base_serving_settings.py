"""A served model's chat template and tool parser (issue 24): set at registration and by PATCH on a base (refused
naming the field for an adapter or an unknown name), shown in its JSON, carried into the Targets of the base and
its adapters, stored by migration 0011 (up and down with rows in place), and given to its managed vLLM server as
flags: written to a file for --chat-template, --enable-auto-tool-choice --tool-call-parser for the parser, and a
change in the registry restarts the idle server with the new ones. The server here is a stand-in that reports
its own flags (real vLLM: tests/integration/test_vllm_tools.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from litestar.testing import TestClient

from api.app import create_app
from composition.resolve import target_for
from registry import db
from registry.chat_templates import chat_template_text
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from serving.engine import EngineUnavailable, GenRequest, GenResult, Sampling, Target
from serving.vllm import VLLMConfig, VLLMEngine
from serving.vllm_process import server_command
from tests.fixtures.cli import invoke
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import free_port

TOOLS = {"chat_template": "smollm2-tools", "tool_parser": "hermes"}


def files_of(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (str(p.relative_to(folder)), p.read_bytes(), "application/octet-stream"))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def refused(resp: Any, param: str, reason: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and reason in error["message"], error


@pytest.fixture
def client(registry_env: RegistryEnv) -> Iterator[TestClient[Any]]:
    with TestClient(app=create_app(registry_env.settings)) as test_client:
        yield test_client


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_set_shown_changed_and_refused_by_field(
    client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path
) -> None:
    admin, query = registry_env.admin, registry_env.query

    def upload(folder: Path, **fields: str) -> Any:
        return client.post("/api/experts", data=fields, files=files_of(folder), headers=admin)

    for field, value in (("chat_template", "chatml-of-mine"), ("tool_parser", "hermes2"), ("chat_template", "{{x}}")):
        before = registry_env.store.blob_count()
        refused(upload(tiny_base, slug="bad", **{field: value}), field, "is not")
        assert registry_env.store.blob_count() == before and not registry_env.leftovers()

    base = upload(tiny_base, slug="tiny", **TOOLS)
    assert base.status_code == 201, base.text
    assert base.json()["serving"] == TOOLS
    plain = upload(tiny_base, slug="plain")
    assert plain.json()["serving"] == {"chat_template": None, "tool_parser": None}

    # an adapter runs on its base's server, with the base's template and parser: it sets neither
    lora = client.post(
        "/api/experts", data={"slug": "lora", "base": "tiny", "tool_parser": "hermes"}, files=files_of(tiny_lora),
        headers=admin,
    )  # fmt: skip
    refused(lora, "tool_parser", "set it on the base")
    lora = client.post("/api/experts", data={"slug": "lora", "base": "tiny"}, files=files_of(tiny_lora), headers=admin)
    assert lora.status_code == 201 and lora.json()["serving"] == {"chat_template": None, "tool_parser": None}
    refused(client.patch("/api/experts/lora", json={"chat_template": "smollm2-tools"}, headers=admin),
            "chat_template", "set it on the base")  # fmt: skip
    assert client.patch("/api/experts/lora", json={"chat_template": None}, headers=admin).status_code == 200

    # PATCH: a name sets it, null sets it back to none; an unknown name is refused and changes nothing
    changed = client.patch("/api/experts/plain", json={"tool_parser": "llama3_json"}, headers=admin)
    assert changed.status_code == 200 and changed.json()["serving"] == {
        "chat_template": None,
        "tool_parser": "llama3_json",
    }
    refused(client.patch("/api/experts/tiny", json={"tool_parser": "nope"}, headers=admin), "tool_parser", "is not")
    cleared = client.patch("/api/experts/tiny", json={"chat_template": None, "description": "d"}, headers=admin)
    assert cleared.json()["serving"] == {"chat_template": None, "tool_parser": "hermes"}
    assert client.get("/api/experts/tiny", headers=query).json()["serving"]["tool_parser"] == "hermes"
    assert client.patch("/api/experts/tiny", json=TOOLS, headers=admin).json()["serving"] == TOOLS

    # an import declares them in its spec like any field
    imported = registry_env.settings.import_roots[0] / "copy"
    shutil.copytree(tiny_base, imported)
    spec = {"slug": "imported", "chat_template": "smollm2-tools"}
    resp = client.post("/api/experts/import", json={"path": str(imported), "expert": spec}, headers=admin)
    assert resp.status_code == 201 and resp.json()["serving"]["chat_template"] == "smollm2-tools"

    # the Targets: the base's own, and its adapter's (the base's server, so the base's settings)
    async def targets() -> dict[str, Target]:
        engine = db.make_engine(registry_env.settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                experts = ExpertService(session, registry_env.store)
                return {s: target_for(await experts.get(s), registry_env.store) for s in ("tiny", "lora", "plain")}
        finally:
            await engine.dispose()

    found = asyncio.run(targets())
    text = chat_template_text("smollm2-tools")
    assert (found["tiny"].chat_template, found["tiny"].tool_parser) == (text, "hermes")
    assert found["lora"].adapter_id and (found["lora"].chat_template, found["lora"].tool_parser) == (text, "hermes")
    assert (found["plain"].chat_template, found["plain"].tool_parser) == (None, "llama3_json")


def test_expert_add_options(cli_env: Path, tiny_base: Path, tiny_lora: Path) -> None:
    assert invoke("db", "upgrade")[0] == 0
    code, output = invoke("expert", "add", str(tiny_base), "--slug", "tiny", "--chat-template", "smollm2-tools",
                          "--tool-parser", "hermes", "--json")  # fmt: skip
    assert code == 0, output
    assert json.loads(output)["serving"] == TOOLS
    code, output = invoke(
        "expert", "add", str(tiny_lora), "--slug", "lora", "--base", "tiny", "--tool-parser", "hermes"
    )
    assert code != 0 and "tool_parser" in output and "set it on the base" in output
    code, output = invoke("expert", "add", str(tiny_base), "--slug", "other", "--chat-template", "mine")
    assert code != 0 and "chat_template" in output


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_migration_0011_up_and_down_with_rows(registry_env: RegistryEnv, tiny_base: Path) -> None:
    url = registry_env.settings.database_url

    async def go(statement: Any = None) -> Any:
        engine = db.make_engine(url)
        try:
            if statement is None:
                async with db.make_sessionmaker(engine)() as session:
                    spec = ExpertSpec(slug="kept", chat_template="smollm2-tools", tool_parser="hermes")
                    await ExpertService(session, registry_env.store).register_folder(tiny_base, spec)
                    return None
            async with engine.connect() as conn:
                return (await conn.execute(statement)).all()
        finally:
            await engine.dispose()

    def columns() -> set[str]:
        async def read() -> set[str]:
            engine = db.make_engine(url)
            try:
                async with engine.connect() as conn:
                    cols = await conn.run_sync(lambda c: sa.inspect(c).get_columns("experts"))
                    return {c["name"] for c in cols}
            finally:
                await engine.dispose()

        return asyncio.run(read())

    asyncio.run(go())
    files = asyncio.run(go(sa.text("SELECT count(*) FROM expert_files")))
    command.downgrade(db.alembic_config(url), "0010")
    assert not {"chat_template", "tool_parser"} & columns()
    # the row (and the rows that refer to it) came through the table's rebuild
    assert asyncio.run(go(sa.text("SELECT slug FROM experts"))) == [("kept",)]
    assert asyncio.run(go(sa.text("SELECT count(*) FROM expert_files"))) == files
    db.upgrade(url)
    assert {"chat_template", "tool_parser"} <= columns()
    rows = asyncio.run(go(sa.text("SELECT slug, chat_template, tool_parser FROM experts")))
    assert rows == [("kept", None, None)]  # the model's own template, no parser: as before the settings existed


def test_server_command_flags() -> None:
    common: dict[str, Any] = dict(model_dir=Path("/m"), served_name="b", port=1, host="h", max_lora_rank=8,
                                  max_loras=2, max_model_len=64)  # fmt: skip
    plain = server_command(**common)
    assert not {"--chat-template", "--enable-auto-tool-choice", "--tool-call-parser"} & set(plain)
    both = server_command(**common, chat_template=Path("/logs/t.jinja"), tool_parser="hermes", extra_args=("--x",))
    assert both[: len(plain)] == plain
    assert both[len(plain) :] == [
        "--chat-template", "/logs/t.jinja",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tool-strict-level", "parameter",
        "--x",
    ]  # fmt: skip
    only_parser = server_command(**common, tool_parser="hermes")
    assert "--chat-template" not in only_parser and only_parser[-4:] == [
        "--tool-call-parser", "hermes", "--tool-strict-level", "parameter"
    ]  # fmt: skip
    only_template = server_command(**common, chat_template=Path("/t.jinja"))
    assert only_template[-2:] == ["--chat-template", "/t.jinja"] and "--tool-call-parser" not in only_template


# A stand-in for vLLM's OpenAI server that answers every completion with its own --tool-call-parser and the text of
# its --chat-template file (or null), so a test sees what the server was started with.
FLAGS_STAND_IN = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
def flag(name):
    return argv[argv.index(name) + 1] if name in argv else None

template = flag("--chat-template")
seen = {
    "tool_parser": flag("--tool-call-parser"),
    "auto_tool_choice": "--enable-auto-tool-choice" in argv,
    "chat_template": open(template).read() if template else None,
}

class Answer(BaseHTTPRequestHandler):
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        models = {"object": "list", "data": [{"id": flag("--served-model-name"), "object": "model"}]}
        self.reply(models if self.path == "/v1/models" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        choice = {"index": 0, "text": json.dumps(seen), "finish_reason": "stop"}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        answer = {"id": "c", "object": "text_completion", "model": body["model"], "choices": [choice]}
        self.reply({**answer, "usage": usage})

    def log_message(self, *_):
        pass

ThreadingHTTPServer((flag("--host"), int(flag("--port"))), Answer).serve_forever()
"""


async def test_a_managed_server_gets_the_flags_and_restarts_when_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stand_in(**kw: Any) -> list[str]:
        return [sys.executable, "-c", FLAGS_STAND_IN, *server_command(**kw)[3:]]

    monkeypatch.setattr("serving.vllm_supervisor.server_command", stand_in)
    engine = VLLMEngine(VLLMConfig(port_start=free_port(), log_dir=tmp_path / "logs", compile=False))
    template = chat_template_text("smollm2-tools")
    tools = Target(base_id="base", base_dir=tmp_path, chat_template=template, tool_parser="hermes")
    plain = Target(base_id="base", base_dir=tmp_path)

    async def ask(target: Target) -> dict[str, Any]:
        for _ in range(200):  # a restart answers 503 until the new process is up (Retry-After)
            [result] = await engine.generate([GenRequest(target, Sampling(max_tokens=1), prompt="hi")])
            if isinstance(result, GenResult):
                return dict(json.loads(result.text))
            assert isinstance(result, EngineUnavailable), result
            await asyncio.sleep(0.1)
        raise AssertionError("the server did not come back")

    try:
        assert await ask(tools) == {"tool_parser": "hermes", "auto_tool_choice": True, "chat_template": template}
        (first,) = await engine.status()
        assert (tmp_path / "logs" / "vllm-base.chat_template.jinja").read_text() == template
        assert await ask(tools) == await ask(tools)  # unchanged: the same process serves
        assert (await engine.status())[0]["pid"] == first["pid"]

        # the base's settings were cleared in the registry: the next request gets a server without the flags
        assert await ask(plain) == {"tool_parser": None, "auto_tool_choice": False, "chat_template": None}
        (second,) = await engine.status()
        assert second["pid"] != first["pid"] and second["state"] == "ready"
        assert await ask(tools) == {"tool_parser": "hermes", "auto_tool_choice": True, "chat_template": template}
    finally:
        await engine.close()
