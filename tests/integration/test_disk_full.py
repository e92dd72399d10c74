"""A full disk under MOERGE_HOME (a real 64 MiB tmpfs holding the SQLite database, the store and the merges):
an upload, a path import and a merge job that fill it up midway each fail with a 507 (or a failed job) saying
what could not be written, leave nothing behind (no expert row, no blob, folder or temporary file: the store
holds exactly what it held before, `moerge expert verify` passes), and the server keeps answering health,
/v1/models and a query; once space is freed, the same request succeeds. A database write on the full disk is a
507 naming the database, not a 500.

Needs root to mount the tmpfs (CI runs as root); skipped, saying why, where mounting is impossible.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from registry import db
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.cli import invoke
from tests.fixtures.db import make_keys
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_finetune, build_tiny_llama

TMPFS_SIZE = "64m"
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base of ~2.2 MB of weights (big enough that a fill leaves room for part of a file) and two finetunes."""
    root = tmp_path_factory.mktemp("disk-full-models")
    base = build_tiny_llama(root / "base", hidden_size=128, intermediate_size=512, vocab_size=512)
    return {
        "base": base,
        "ft-a": build_tiny_finetune(base, root / "ft-a", seed=1),
        "ft-b": build_tiny_finetune(base, root / "ft-b", seed=2),
        "ft-c": build_tiny_finetune(base, root / "ft-c", seed=3),
    }


def _mount_tmpfs(where: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")


@dataclass
class Full:
    """A server whose MOERGE_HOME is a small tmpfs, and the means to fill it."""

    settings: Settings
    http: httpx.Client
    admin: dict[str, str]
    query: dict[str, str]
    imports: Path

    @property
    def home(self) -> Path:
        return self.settings.home

    def free_bytes(self) -> int:
        st = os.statvfs(self.home)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Take all the free space but ``leave`` bytes (to the page)."""
        fd = os.open(self.home / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            current = os.fstat(fd).st_size
            os.posix_fallocate(fd, 0, current + self.free_bytes() - leave)
        finally:
            os.close(fd)
        assert abs(self.free_bytes() - leave) <= 2 * 4096, self.free_bytes()

    def unfill(self) -> None:
        (self.home / "filler").unlink(missing_ok=True)

    def contents(self) -> set[str]:
        """Every file the store and the merges folder hold (with its size), and every folder but the blobs'
        two-letter shards (made as needed and kept, empty or not)."""
        found: set[str] = set()
        blobs = self.settings.store_dir / "blobs"
        for root in (self.settings.store_dir, self.settings.merges_dir):
            if root.exists():
                for path in root.rglob("*"):
                    rel = str(path.relative_to(self.home))
                    if path.is_file():
                        found.add(f"{rel} {path.stat().st_size}")
                    elif path.parent != blobs:
                        found.add(f"{rel}/")
        return found

    def assert_still_serving(self) -> None:
        health = self.http.get("/api/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        models = self.http.get("/v1/models", headers=self.query)
        assert models.status_code == 200 and "base" in {m["id"] for m in models.json()["data"]}, models.text
        chat = self.http.post(
            "/v1/chat/completions",
            headers=self.query,
            json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert chat.status_code == 200, chat.text

    def assert_store_verifies(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MOERGE_HOME", str(self.home))
        monkeypatch.delenv("MOERGE_DATABASE_URL", raising=False)
        code, output = invoke("expert", "verify")
        assert code == 0, output


@pytest.fixture
def full(tmp_path: Path, models: dict[str, Path]) -> Iterator[Full]:
    home = tmp_path / "home"
    home.mkdir()
    _mount_tmpfs(home)
    try:
        imports = tmp_path / "imports"  # on the ordinary disk: an import reads from there, writes the store only
        imports.mkdir()
        url = f"sqlite+aiosqlite:///{home / 'moerge.db'}"  # the default layout: the database on the same disk
        settings = Settings(home=home, database_url=url, import_roots=(imports.resolve(),))
        db.upgrade(url)
        admin, query = make_keys(url)
        register(settings, models["base"], ExpertSpec(slug="base"))
        for slug in ("ft-a", "ft-b"):
            register(settings, models[slug], ExpertSpec(slug=slug, base="base"))
        with serve(settings, TorchEngine()) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
            yield Full(
                settings, http, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {query}"}, imports
            )
    finally:
        if subprocess.run(["umount", str(home)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(home)], check=False)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _upload(full: Full, folder: Path, slug: str) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
    return full.http.post("/api/experts", headers=full.admin, data={"slug": slug, "base": "base"}, files=files)


def _assert_insufficient_storage(resp: httpx.Response, *words: str) -> dict[str, Any]:
    assert resp.status_code == 507, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == "insufficient_storage" and error["type"] == "server_error", error
    for word in ("full", *words):
        assert word in error["message"], error
    return error


@pytest.mark.parametrize("fails_in", ["staging", "store"])
def test_an_upload_that_fills_the_disk(full: Full, models: dict[str, Path], fails_in: str, monkeypatch: Any) -> None:
    folder = models["ft-c"]
    weights = (folder / "model.safetensors").stat().st_size
    before = full.contents()
    # staging: the upload's own copy runs out; store: the copy fits, then storing its blobs runs out halfway
    # through the weights (the tokenizer and config are the base's: stored once, not again).
    full.fill(_folder_bytes(folder) // 2 if fails_in == "staging" else _folder_bytes(folder) + weights // 2)

    error = _assert_insufficient_storage(_upload(full, folder, "ft-c"))
    if fails_in == "store":
        assert "storing 'model.safetensors'" in error["message"], error
    else:
        assert "receiving the upload" in error["message"], error

    assert full.http.get("/api/experts/ft-c", headers=full.query).status_code == 404
    assert full.contents() == before  # no blob, folder or staging file left
    full.assert_still_serving()
    full.unfill()
    full.assert_store_verifies(monkeypatch)
    assert _upload(full, folder, "ft-c").status_code == 201


def test_an_import_that_fills_the_disk(full: Full, models: dict[str, Path], monkeypatch: Any) -> None:
    folder = shutil.copytree(models["ft-c"], full.imports / "ft-c")
    body = {"path": str(folder), "expert": {"slug": "ft-c", "base": "base"}}
    before = full.contents()
    full.fill((folder / "model.safetensors").stat().st_size // 2)

    error = _assert_insufficient_storage(full.http.post("/api/experts/import", headers=full.admin, json=body))
    assert "storing 'model.safetensors'" in error["message"], error

    assert full.http.get("/api/experts/ft-c", headers=full.query).status_code == 404
    assert full.contents() == before
    full.assert_still_serving()
    full.unfill()
    full.assert_store_verifies(monkeypatch)
    assert full.http.post("/api/experts/import", headers=full.admin, json=body).status_code == 201


TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [{"model": "ft-a"}, {"model": "ft-b"}],
    "parameters": {"density": 0.5},
    "name": "ties-ab",
}


def _wait_job(full: Full, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = full.http.get(f"/api/merges/{job_id}", headers=full.query).json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.mark.parametrize("fails_in", ["merging", "registering"])
def test_a_merge_that_fills_the_disk(full: Full, models: dict[str, Path], fails_in: str, monkeypatch: Any) -> None:
    weights = (models["base"] / "model.safetensors").stat().st_size  # the merged model's, too
    before = full.contents()
    # merging: the output itself does not fit; registering: it does, then storing it in the store does not.
    full.fill(weights // 2 if fails_in == "merging" else weights + weights // 2)

    submitted = full.http.post("/api/merges", headers=full.admin, json=TIES)
    assert submitted.status_code == 201, submitted.text
    job = _wait_job(full, submitted.json()["id"])
    assert job["status"] == "failed", job
    assert "full" in job["error"], job
    where = "merged model" if fails_in == "merging" else "storing 'model.safetensors'"
    assert where in job["error"], job

    assert full.http.get("/api/experts/ties-ab", headers=full.query).status_code == 404
    assert full.contents() == before  # the output folder, its partial and any blob: all gone
    assert not any(full.settings.merges_dir.iterdir())
    full.assert_still_serving()
    full.unfill()
    full.assert_store_verifies(monkeypatch)
    again = full.http.post("/api/merges", headers=full.admin, json=TIES)
    assert _wait_job(full, again.json()["id"])["status"] == "succeeded"


def test_a_database_write_on_a_full_disk(full: Full) -> None:
    """SQLite itself cannot write: 507 naming the database, the transaction rolled back, reads still served."""
    database = full.home / "moerge.db"
    with sqlite3.connect(database) as conn:  # empty the WAL, so the next write needs new space
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and (full.home / "moerge.db-wal").stat().st_size == 0
    full.fill(0)

    patch = full.http.patch("/api/experts/ft-a", headers=full.admin, json={"description": "x" * 200_000})
    error = _assert_insufficient_storage(patch, "database")
    assert error["param"] == "database", error
    merge = full.http.post("/api/merges", headers=full.admin, json=TIES)
    _assert_insufficient_storage(merge, "database")

    assert full.http.get("/api/experts/ft-a", headers=full.query).json()["description"] != "x" * 200_000
    full.assert_still_serving()
    full.unfill()
    patch = full.http.patch("/api/experts/ft-a", headers=full.admin, json={"description": "x" * 200_000})
    assert patch.status_code == 200, patch.text
    assert full.http.get("/api/merges", headers=full.query).json()["total"] == 0
