"""GET /api/experts/{ref}/files[/{name}]: an expert's manifest and bytes for vLLM servers elsewhere, under the
`fetch` scope only (a query key cannot fetch; a fetch key cannot query), with ETags and single byte ranges."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from api.app import create_app
from registry import db
from registry.keys import ApiKeyService
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register


def _fetch_key(database_url: str) -> str:
    async def create() -> str:
        engine = db.make_engine(database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                _, secret = await ApiKeyService(session).create("resolver", ["fetch"])
                return secret
        finally:
            await engine.dispose()

    return asyncio.run(create())


@pytest.fixture
def files(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> Iterator[dict[str, Any]]:
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(registry_env.settings, tiny_lora, ExpertSpec(slug="lora-a", base="tiny-base"))
    fetch = {"Authorization": f"Bearer {_fetch_key(registry_env.settings.database_url)}"}
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        yield {"client": client, "fetch": fetch, "env": registry_env, "folder": tiny_lora}


def test_the_manifest_and_the_bytes(files: dict[str, Any]) -> None:
    client, fetch, folder = files["client"], files["fetch"], files["folder"]
    listing = client.get("/api/experts/lora-a/files", headers=fetch)
    assert listing.status_code == 200, listing.text
    manifest = {f["path"]: f for f in listing.json()["files"]}
    on_disk = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert set(manifest) == set(on_disk) and listing.json()["slug"] == "lora-a"
    for name, data in on_disk.items():
        assert manifest[name]["sha256"] == hashlib.sha256(data).hexdigest() and manifest[name]["size"] == len(data)
        got = client.get(f"/api/experts/lora-a/files/{name}", headers=fetch)
        assert got.status_code == 200 and got.content == data
        assert got.headers["etag"] == f'"{manifest[name]["sha256"]}"' and got.headers["accept-ranges"] == "bytes"
    # by id too, and an unchanged file is a 304
    expert_id = listing.json()["id"]
    name, data = "adapter_config.json", on_disk["adapter_config.json"]
    etag = manifest[name]["sha256"]
    same = client.get(f"/api/experts/{expert_id}/files/{name}", headers={**fetch, "if-none-match": f'"{etag}"'})
    assert same.status_code == 304 and same.content == b""


def test_single_byte_ranges(files: dict[str, Any]) -> None:
    client, fetch = files["client"], files["fetch"]
    name = "adapter_model.safetensors"
    data = (files["folder"] / name).read_bytes()
    size = len(data)
    url = f"/api/experts/lora-a/files/{name}"
    cases = {"bytes=0-9": data[:10], "bytes=10-": data[10:], "bytes=-7": data[-7:], f"bytes=5-{size + 100}": data[5:]}
    for header, want in cases.items():
        part = client.get(url, headers={**fetch, "range": header})
        assert part.status_code == 206 and part.content == want, header
        first = size - len(want)
        assert part.headers["content-range"] == f"bytes {first}-{size - 1}/{size}" or header == "bytes=0-9"
    assert client.get(url, headers={**fetch, "range": "bytes=0-9"}).headers["content-range"] == f"bytes 0-9/{size}"
    for header in (f"bytes={size}-", "bytes=-0"):
        refused = client.get(url, headers={**fetch, "range": header})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}", header
    for header in ("bytes=0-1,4-5", "items=0-3", "bytes=9-2", "bytes=" + "9" * 300):  # ignored: the whole file
        whole = client.get(url, headers={**fetch, "range": header})
        assert whole.status_code == 200 and whole.content == data, header


def test_scopes_and_names(files: dict[str, Any]) -> None:
    client, fetch, env = files["client"], files["fetch"], files["env"]
    url = "/api/experts/lora-a/files/adapter_config.json"
    assert client.get(url, headers=env.query).status_code == 403  # a query key cannot fetch files
    assert client.get(url).status_code == 401
    assert client.get(url, headers=env.admin).status_code == 200
    assert client.get("/v1/models", headers=fetch).status_code == 403  # a fetch key cannot query ...
    assert client.get("/api/experts/lora-a", headers=fetch).status_code == 403  # ... nor read the registry
    chat = {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", headers=fetch, json=chat).status_code == 403
    for bad in ("nope.bin", "../lora-a/adapter_config.json", "%2e%2e/%2e%2e/moerge.db"):
        resp = client.get(f"/api/experts/lora-a/files/{bad}", headers=fetch)
        assert resp.status_code in (400, 404), (bad, resp.status_code)
    assert client.get("/api/experts/nobody/files", headers=fetch).status_code == 404
