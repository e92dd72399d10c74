"""/api/experts through Litestar's test client, on SQLite and PostgreSQL, with tiny real models."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from api.app import create_app
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.tiny import build_tiny_llama, build_tiny_lora

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture
def client(registry_env: RegistryEnv) -> Iterator[TestClient[Any]]:
    with TestClient(app=create_app(registry_env.settings)) as test_client:
        yield test_client


def folder_files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (str(p.relative_to(folder)), p.read_bytes(), "application/octet-stream"))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def tar_of(folder: Path, top: str = "model") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=top)
    return buf.getvalue()


def register_base(client: TestClient[Any], env: RegistryEnv, folder: Path, slug: str = "tiny-base") -> dict[str, Any]:
    resp = client.post(
        "/api/experts",
        data={"slug": slug, "description": "tiny llama", "tags": ["t"]},
        files=folder_files(folder),
        headers=env.admin,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def state(client: TestClient[Any], env: RegistryEnv) -> tuple[int, int, int, list[Path]]:
    """(rows, blobs, expert folders, tmp leftovers): what a refused request must leave unchanged."""
    total = client.get("/api/experts", headers=env.query).json()["total"]
    folders = len(list(env.store.experts.iterdir())) if env.store.experts.exists() else 0
    return total, env.store.blob_count(), folders, env.leftovers()


def assert_refused(resp: Any, status: int, param: str, reason: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert param in (error["param"] or ""), error
    assert reason.lower() in error["message"].lower(), error


def test_health_needs_no_key(client: TestClient[Any], registry_env: RegistryEnv) -> None:
    resp = client.get("/api/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}  # the checks behind it are for admins (tests/integration/test_no_leaks.py)
    body = client.get("/api/health", headers=registry_env.admin).json()
    assert body["status"] == "ok" and body["checks"]["database"]["ok"]


def test_keys_and_scopes(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path) -> None:
    assert_refused(client.get("/api/experts"), 401, "authorization", "missing API key")
    assert_refused(
        client.get("/api/experts", headers={"Authorization": "Bearer nope-nope-nope-nope"}),
        401,
        "authorization",
        "invalid",
    )
    resp = client.post("/api/experts", data={"slug": "x"}, files=folder_files(tiny_base), headers=registry_env.query)
    assert_refused(resp, 403, "authorization", "admin")
    assert client.get("/api/experts", headers=registry_env.query).status_code == 200


def test_register_base_and_adapter(
    client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path
) -> None:
    base = register_base(client, registry_env, tiny_base)
    assert base["kind"] == "base"
    assert base["compatibility"]["architecture"] == "LlamaForCausalLM"
    assert base["compatibility"]["dtype"] == "float32"
    assert base["compatibility"]["tokenizer_hash"]
    assert {f["path"] for f in base["integrity"]["files"]} >= {"config.json", "model.safetensors"}

    resp = client.post(
        "/api/experts",
        data={
            "slug": "tiny-lora",
            "base": "tiny-base",
            "skills": ["math", "dates"],
            "example_prompts": ["What is 2+2?"],
            "description": "adds numbers",
        },
        files={"archive": ("lora.tar.gz", tar_of(tiny_lora), "application/gzip")},
        headers=registry_env.admin,
    )
    assert resp.status_code == 201, resp.text
    lora = resp.json()
    assert lora["kind"] == "adapter"
    assert lora["lineage"]["base"] == "tiny-base"
    assert lora["compatibility"]["r"] == 4 and lora["compatibility"]["lora_alpha"] == 8
    assert lora["compatibility"]["target_modules"] == ["q_proj", "v_proj"]
    assert lora["routing"]["skills"] == ["math", "dates"]

    listing = client.get("/api/experts", params={"base": "tiny-base"}, headers=registry_env.query).json()
    assert [e["slug"] for e in listing["data"]] == ["tiny-lora"]
    assert client.get("/api/experts", params={"skill": "dates"}, headers=registry_env.query).json()["total"] == 1
    assert client.get("/api/experts", params={"kind": "base"}, headers=registry_env.query).json()["total"] == 1
    assert client.get("/api/experts", params={"tag": "t"}, headers=registry_env.query).json()["total"] == 1
    page = client.get("/api/experts", params={"limit": 1, "offset": 1}, headers=registry_env.query).json()
    assert page["total"] == 2 and [e["slug"] for e in page["data"]] == ["tiny-lora"]

    # the expert's folder in the store is a loadable PEFT folder
    folder = registry_env.store.expert_dir(lora["id"])
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()


def test_same_weights_stored_once(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path) -> None:
    register_base(client, registry_env, tiny_base, "first")
    blobs = registry_env.store.blob_count()
    register_base(client, registry_env, tiny_base, "second")
    assert registry_env.store.blob_count() == blobs
    assert client.get("/api/experts", headers=registry_env.query).json()["total"] == 2


def test_import_from_root(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path) -> None:
    inside = registry_env.settings.import_roots[0] / "base"
    shutil.copytree(tiny_base, inside)
    resp = client.post(
        "/api/experts/import",
        json={"path": str(inside), "expert": {"slug": "imported"}},
        headers=registry_env.admin,
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["lineage"]["source_uri"] == f"file://{inside.resolve()}"

    outside = tmp_path / "elsewhere"
    shutil.copytree(tiny_base, outside)
    before = state(client, registry_env)
    resp = client.post(
        "/api/experts/import",
        json={"path": str(outside), "expert": {"slug": "nope"}},
        headers=registry_env.admin,
    )
    assert_refused(resp, 403, "path", "import roots")
    assert state(client, registry_env) == before


def test_card_patch_delete(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path) -> None:
    with_card = tmp_path / "carded"
    shutil.copytree(tiny_base, with_card)
    (with_card / "README.md").write_text("---\nlicense: mit\ntags: [tiny]\n---\n# Tiny\n\nA tiny test model.\n")
    register_base(client, registry_env, with_card, "carded")

    card = client.get("/api/experts/carded/card", headers=registry_env.query)
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
    assert card.text.startswith("---\n") and "license: mit" in card.text and "A tiny test model." in card.text
    as_json = client.get("/api/experts/carded/card", params={"format": "json"}, headers=registry_env.query).json()
    assert as_json["metadata"]["license"] == "mit" and "tiny" in as_json["metadata"]["tags"]

    resp = client.patch(
        "/api/experts/carded",
        json={"description": "new", "skills": ["s"], "aliases": ["c2"]},
        headers=registry_env.admin,
    )
    assert resp.status_code == 200 and resp.json()["description"] == "new"
    assert client.get("/api/experts/c2", headers=registry_env.query).json()["slug"] == "carded"
    assert_refused(
        client.patch("/api/experts/carded", json={"colour": "red"}, headers=registry_env.admin),
        400,
        "colour",
        "unknown field",
    )
    assert_refused(client.get("/api/experts/missing", headers=registry_env.query), 404, "expert", "no expert")

    resp = client.post(
        "/api/experts/carded/evals",
        json={"task": "dates", "metric": "exact_match", "value": 0.9},
        headers=registry_env.admin,
    )
    assert resp.status_code == 201 and resp.json()["evals"][0]["value"] == 0.9
    assert "model-index" in client.get("/api/experts/carded/card", headers=registry_env.query).text

    # a blob another registration has stored but not yet committed: no row refers to it, and it must stay
    (tmp_path / "in-flight.bin").write_bytes(b"another registration's file")
    in_flight = registry_env.store.put_file(tmp_path / "in-flight.bin")[0]
    own = [
        f["sha256"] for f in client.get("/api/experts/carded", headers=registry_env.query).json()["integrity"]["files"]
    ]
    blobs_before = registry_env.store.blob_count()
    assert client.delete("/api/experts/carded", headers=registry_env.admin).status_code == 204
    assert client.get("/api/experts/carded", headers=registry_env.query).status_code == 404
    assert registry_env.store.blob_count() == blobs_before - len(set(own))  # its own blobs went
    assert registry_env.store.blob_path(in_flight).exists()
    assert not any(registry_env.store.experts.iterdir())


def test_delete_refused_while_in_use(
    client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path
) -> None:
    import asyncio

    from registry import db
    from registry.models import Composition, CompositionMember

    register_base(client, registry_env, tiny_base)
    resp = client.post(
        "/api/experts",
        data={"slug": "lora", "base": "tiny-base"},
        files=folder_files(tiny_lora),
        headers=registry_env.admin,
    )
    lora_id = resp.json()["id"]
    assert_refused(client.delete("/api/experts/tiny-base", headers=registry_env.admin), 409, "expert", "base of")

    async def add_composition() -> None:
        import uuid

        engine = db.make_engine(registry_env.settings.database_url)
        async with db.make_sessionmaker(engine)() as session:
            comp = Composition(name="c", router="direct")
            comp.members = [CompositionMember(expert_id=uuid.UUID(lora_id))]
            session.add(comp)
            await session.commit()
        await engine.dispose()

    asyncio.run(add_composition())
    assert_refused(client.delete("/api/experts/lora", headers=registry_env.admin), 409, "force", "composition 'c'")
    assert client.get("/api/experts/lora", headers=registry_env.query).status_code == 200
    assert client.delete("/api/experts/lora", params={"force": True}, headers=registry_env.admin).status_code == 204
    assert client.get("/api/experts/lora", headers=registry_env.query).status_code == 404


# -- bad input: each refused with the field and the reason, leaving nothing behind -------------------------
def corrupt_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def add_pickle(folder: Path) -> None:
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


@pytest.mark.parametrize(
    ("mutate", "param", "reason"),
    [
        (corrupt_header, "model.safetensors", "header"),
        (truncate, "model.safetensors", "truncated"),
        (add_pickle, "pytorch_model.bin", "safetensors only"),
    ],
    ids=["corrupt-header", "truncated", "pickle"],
)
def test_bad_files_refused(
    client: TestClient[Any],
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
    mutate: Any,
    param: str,
    reason: str,
) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(tiny_base, folder)
    mutate(folder)
    before = state(client, registry_env)
    resp = client.post("/api/experts", data={"slug": "bad"}, files=folder_files(folder), headers=registry_env.admin)
    assert_refused(resp, 400, param, reason)
    assert state(client, registry_env) == before


def test_adapter_without_registered_base(client: TestClient[Any], registry_env: RegistryEnv, tiny_lora: Path) -> None:
    before = state(client, registry_env)
    resp = client.post(
        "/api/experts", data={"slug": "orphan"}, files=folder_files(tiny_lora), headers=registry_env.admin
    )
    assert_refused(resp, 400, "base", "not registered")
    assert state(client, registry_env) == before


def test_adapter_shapes_must_fit_base(
    client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path
) -> None:
    register_base(client, registry_env, tiny_base)
    wider = build_tiny_llama(tmp_path / "wider", hidden_size=48, intermediate_size=96)
    misfit = build_tiny_lora(wider, tmp_path / "misfit", base_model_name_or_path="tiny-base")
    before = state(client, registry_env)
    resp = client.post("/api/experts", data={"slug": "misfit"}, files=folder_files(misfit), headers=registry_env.admin)
    assert_refused(resp, 400, "adapter_model.safetensors", "shape")
    assert state(client, registry_env) == before


def _archive_with(member: str | None = None, *, link: bool = False, big: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
        if member:
            info = tarfile.TarInfo(member)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        if link:
            info = tarfile.TarInfo("model.safetensors")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        if big:
            info = tarfile.TarInfo("model.safetensors")
            info.size = big
            tf.addfile(info, io.BytesIO(b"\0" * big))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "status", "param", "reason"),
    [
        (lambda: _archive_with("../evil.txt"), 400, "archive", ".."),
        (lambda: _archive_with("/abs/evil.txt"), 400, "archive", "absolute"),
        (lambda: _archive_with(link=True), 400, "archive", "link"),
        (lambda: _archive_with(big=65 * 1024 * 1024), 413, "archive", "limit"),
    ],
    ids=["dotdot", "absolute", "symlink", "too-big"],
)
def test_bad_archives_refused(
    client: TestClient[Any], registry_env: RegistryEnv, archive: Any, status: int, param: str, reason: str
) -> None:
    before = state(client, registry_env)
    resp = client.post(
        "/api/experts",
        data={"slug": "arch"},
        files={"archive": ("a.tar.gz", archive(), "application/gzip")},
        headers=registry_env.admin,
    )
    assert_refused(resp, status, param, reason)
    assert state(client, registry_env) == before


def test_zip_upload_works(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in tiny_base.iterdir():
            zf.write(p, p.name)
    resp = client.post(
        "/api/experts",
        data={"slug": "zipped"},
        files={"archive": ("m.zip", buf.getvalue(), "application/zip")},
        headers=registry_env.admin,
    )
    assert resp.status_code == 201, resp.text


def test_duplicate_slug_and_unknown_fields(client: TestClient[Any], registry_env: RegistryEnv, tiny_base: Path) -> None:
    register_base(client, registry_env, tiny_base)
    before = state(client, registry_env)
    resp = client.post(
        "/api/experts", data={"slug": "tiny-base"}, files=folder_files(tiny_base), headers=registry_env.admin
    )
    assert_refused(resp, 409, "slug", "already exists")
    resp = client.post(
        "/api/experts",
        data={"slug": "other", "colour": "red"},
        files=folder_files(tiny_base),
        headers=registry_env.admin,
    )
    assert_refused(resp, 400, "colour", "unknown field")
    resp = client.post(
        "/api/experts/import",
        json={"path": "x", "expert": {"slug": "y", "colour": "red"}},
        headers=registry_env.admin,
    )
    assert_refused(resp, 400, "expert.colour", "unknown field")
    resp = client.post(
        "/api/experts", data={"slug": "Bad Slug"}, files=folder_files(tiny_base), headers=registry_env.admin
    )
    assert_refused(resp, 400, "slug", "not a valid name")
    assert state(client, registry_env) == before
