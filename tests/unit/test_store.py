"""The content-addressed store: dedup, atomic writes, expert folders, garbage collection, verification."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from registry.store import ArtifactStore, manifest_digest


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    s = ArtifactStore(tmp_path / "store")
    s.ensure()
    return s


def test_put_is_content_addressed_and_deduplicated(store: ArtifactStore, tmp_path: Path) -> None:
    a = tmp_path / "a.bin"
    b = tmp_path / "b.bin"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    sha, size, created = store.put_file(a)
    assert sha == hashlib.sha256(b"same bytes").hexdigest() and size == 10 and created
    assert store.put_file(b) == (sha, 10, False)
    assert store.blob_count() == 1
    assert store.blob_path(sha).read_bytes() == b"same bytes"
    assert store.leftovers() == []  # no temporary file survives


def test_failed_ingest_takes_back_new_blobs(store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "one").write_bytes(b"1")
    with pytest.raises(FileNotFoundError):
        store.ingest_folder(folder, ["one", "missing"])
    assert store.blob_count() == 0 and store.leftovers() == []


def test_materialize_links_blobs(store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w").write_bytes(os.urandom(64))
    result = store.ingest_folder(folder, ["config.json", "sub/w"])
    out = store.materialize("e1", [(rel, sha) for rel, sha, _ in result.files])
    assert (out / "sub" / "w").read_bytes() == (folder / "sub" / "w").read_bytes()
    assert os.stat(out / "sub" / "w").st_ino == os.stat(store.blob_path(result.files[1][1])).st_ino
    store.remove_expert_dir("e1")
    assert not store.expert_dir("e1").exists() and store.blob_count() == 2  # the blobs stay until discarded


def test_verify_finds_missing_and_changed(store: ArtifactStore, tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"original")
    sha, _, _ = store.put_file(f)
    assert store.verify([("x", sha)]) == []
    blob = store.blob_path(sha)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    (damage,) = store.verify([("x", sha)])
    assert damage.problem.startswith("hash mismatch")
    blob.unlink()
    assert store.verify([("x", sha)])[0].problem == "missing"


def test_manifest_digest_is_order_independent() -> None:
    assert manifest_digest([("a", "1"), ("b", "2")]) == manifest_digest([("b", "2"), ("a", "1")])
    assert manifest_digest([("a", "1")]) != manifest_digest([("a", "2")])


def test_sweep_removes_what_a_killed_write_left_once_it_is_old(store: ArtifactStore, tmp_path: Path) -> None:
    """A process killed mid-registration leaves a staging folder, an expert folder with no row and blobs no
    row refers to; a sweep removes them once untouched for min_age_s, and never what is referenced."""
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("kept", "orphan", "shared"):
        (folder / name).write_bytes(name.encode())
    kept = store.ingest_folder(folder, ["kept", "shared"])
    store.materialize("live", [(rel, sha) for rel, sha, _ in kept.files])
    orphan = store.ingest_folder(folder, ["orphan"])
    store.materialize("dead", [(rel, sha) for rel, sha, _ in orphan.files])
    staging = store.staging_dir()
    (staging / "upload.part").write_bytes(b"half")
    referenced = {sha for _, sha, _ in kept.files}

    assert store.sweep(referenced, {"live"}, min_age_s=3600) == []  # all fresh: maybe another process's
    old = 1_000_000_000.0

    def age() -> None:
        for path in [*store.tmp.rglob("*"), *store.experts.rglob("*"), *store.blobs.glob("*/*")]:
            os.utime(path, (old, old), follow_symlinks=False)

    age()
    # a blob that a new registration just found already stored is fresh again, so it (and the folder that
    # links it) is spared
    store.put_file(folder / "orphan")
    assert store.sweep(referenced, {"live"}, min_age_s=3600) == [staging]
    age()
    assert store.sweep(referenced, {"live"}, min_age_s=3600) == [
        store.expert_dir("dead"),
        store.blob_path(orphan.files[0][1]),
    ]
    assert store.leftovers() == [] and sorted(p.name for p in store.experts.iterdir()) == ["live"]
    assert store.blob_count() == 2 and (store.expert_dir("live") / "kept").read_bytes() == b"kept"
