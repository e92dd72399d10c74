"""Training data attached to an expert: POST/GET /api/experts/{ref}/training-data on SQLite and PostgreSQL,
refusals that name the line and field and store nothing, and `moerge expert training-data`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app as cli_app
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.integration.test_experts_api import assert_refused, folder_files, register_base

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
    {"prompt": "Reverse: a b c", "answer": "c b a"},
]


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture
def client(registry_env: RegistryEnv) -> Iterator[TestClient[Any]]:
    with TestClient(app=create_app(registry_env.settings)) as test_client:
        yield test_client


@pytest.fixture
def lora(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> str:
    register_base(client, registry_env, tiny_base)
    resp = client.post(
        "/api/experts",
        data={"slug": "tiny-lora", "base": "tiny-base"},
        files=folder_files(tiny_lora),
        headers=registry_env.admin,
    )
    assert resp.status_code == 201, resp.text
    return "tiny-lora"


def _post(client: TestClient[Any], env: RegistryEnv, body: bytes, ref: str = "tiny-lora", **headers: str) -> Any:
    return client.post(f"/api/experts/{ref}/training-data", content=body, headers={**env.admin, **headers})


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_upload_and_read_back(client: TestClient[Any], registry_env: RegistryEnv, lora: str) -> None:
    before = client.get(f"/api/experts/{lora}", headers=registry_env.query).json()["updated_at"]
    resp = _post(client, registry_env, jsonl(ROWS), **{"content-type": "application/jsonl"})
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["expert"] == lora and info["rows"] == 3 and len(info["sha256"]) == 64
    assert registry_env.store.blob_path(info["sha256"]).is_file()

    got = client.get(f"/api/experts/{lora}/training-data", headers=registry_env.query)
    assert got.status_code == 200
    assert got.json()["data"] == ROWS and got.json()["sha256"] == info["sha256"]
    raw = client.get(f"/api/experts/{lora}/training-data", params={"format": "jsonl"}, headers=registry_env.query)
    assert [json.loads(line) for line in raw.text.splitlines()] == ROWS
    # Attaching is a change of the expert.
    assert client.get(f"/api/experts/{lora}", headers=registry_env.query).json()["updated_at"] != before

    # The same rows as a JSON list: same canonical bytes, same blob. New rows replace the old ones, whose
    # blob is removed once nothing refers to it.
    again = _post(client, registry_env, json.dumps(ROWS).encode(), **{"content-type": "application/json"})
    assert again.status_code == 201 and again.json()["sha256"] == info["sha256"]
    replaced = _post(client, registry_env, jsonl(ROWS[:1]))
    assert replaced.status_code == 201 and replaced.json()["rows"] == 1
    assert not registry_env.store.blob_path(info["sha256"]).exists()
    assert client.get(f"/api/experts/{lora}/training-data", headers=registry_env.query).json()["data"] == ROWS[:1]
    assert registry_env.leftovers() == []

    # Deleting the expert drops its data and the blob.
    sha = replaced.json()["sha256"]
    assert client.delete(f"/api/experts/{lora}", headers=registry_env.admin).status_code == 204
    assert not registry_env.store.blob_path(sha).exists()


BAD = [
    (jsonl([ROWS[0], ROWS[2], {"prompt": "x"}]), "training_data.line[3].answer", "line 3"),
    (jsonl([ROWS[0], {"prompt": "x", "answer": ""}]), "training_data.line[2].answer", "non-empty"),
    (jsonl([ROWS[0]]) + b"{not json\n", "training_data.line[2]", "invalid JSON"),
    (jsonl([{"prompt": "x", "answer": "y", "lang": "en"}]), "training_data.line[1].lang", "not a known field"),
    (
        json.dumps(
            [ROWS[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}]
        ).encode(),
        "training_data[1].messages[1].role",
        "assistant",
    ),
    (
        json.dumps([ROWS[0], {"messages": [{"role": "bot", "content": "hi"}]}]).encode(),
        "training_data[1].messages",
        "at least two",
    ),
    (
        json.dumps([{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}]).encode(),
        "training_data[0].messages[0].role",
        "one of",
    ),
    (json.dumps([ROWS[0], "just text"]).encode(), "training_data[1]", "row 1"),
    (b"", "training_data", "no rows"),
    (b"\xff\xfe", "training_data", "UTF-8"),
]


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_bad_rows_are_refused_and_nothing_is_stored(
    client: TestClient[Any], registry_env: RegistryEnv, lora: str
) -> None:
    blobs = registry_env.store.blob_count()
    for body, param, reason in BAD:
        assert_refused(_post(client, registry_env, body), 400, param, reason)
        assert registry_env.store.blob_count() == blobs and registry_env.leftovers() == []
    refused = client.get(f"/api/experts/{lora}/training-data", headers=registry_env.query)
    assert_refused(refused, 404, "training_data", "no training data")

    # Earlier data stays in place when a later upload is refused.
    assert _post(client, registry_env, jsonl(ROWS)).status_code == 201
    assert_refused(_post(client, registry_env, jsonl([ROWS[0], {"answer": "y"}])), 400, "line[2].prompt", "required")
    assert client.get(f"/api/experts/{lora}/training-data", headers=registry_env.query).json()["rows"] == 3

    assert_refused(
        client.post(f"/api/experts/{lora}/training-data", content=jsonl(ROWS), headers=registry_env.query),
        403,
        "authorization",
        "admin",
    )
    assert_refused(_post(client, registry_env, jsonl(ROWS), ref="nope"), 404, "expert", "no expert")


def test_cli_attaches_and_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_base: Path, tiny_lora: Path
) -> None:
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOERGE_DATABASE_URL", raising=False)

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli_app, list(args))
        return result.exit_code, result.output

    assert invoke("db", "upgrade")[0] == 0
    assert invoke("expert", "add", str(tiny_base), "--slug", "tiny-base")[0] == 0
    assert invoke("expert", "add", str(tiny_lora), "--slug", "tiny-lora", "--base", "tiny-base")[0] == 0
    good = tmp_path / "train.jsonl"
    good.write_bytes(jsonl(ROWS))
    code, output = invoke("expert", "training-data", "tiny-lora", str(good))
    assert code == 0 and "attached 3 training rows to tiny-lora" in output, output
    code, output = invoke("expert", "training-data", "tiny-lora", "--json")
    assert code == 0 and json.loads(output)["data"] == ROWS

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([ROWS[0], {"prompt": "x"}]))
    code, output = invoke("expert", "training-data", "tiny-lora", str(bad))
    assert code == 1 and "training_data.line[2].answer" in output and "line 2" in output, output
    code, output = invoke("expert", "training-data", "tiny-lora")
    assert code == 0 and "3 training rows" in output  # the refused file changed nothing
