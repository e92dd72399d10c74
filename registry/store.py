"""Content-addressed artifact store.

A file is kept once, under ``blobs/<sha[:2]>/<sha>``, whatever expert it belongs to. Writes go to a
temporary name in the same filesystem, are fsynced and renamed, so a blob either exists whole or not at
all. An expert's folder, as engines need it (config.json, *.safetensors, tokenizer ...), is a tree of
hard links to blobs (copies where the filesystem has none; never symlinks) under ``experts/<id>/``, built the
same way (temporary folder, then rename).

Concurrent writers: a blob is created with ``link(2)``, which fails if the name exists, so of two processes
storing the same bytes exactly one is its creator; the other reuses it and touches its mtime. A blob is only
removed when no expert folder links it and nobody has reused it since (see ``discard_blobs``); a blob removed
anyway (by hand) is reported by ``verify`` and stored again by the next registration of the same bytes.

A full disk (ENOSPC, EDQUOT) while writing raises ``InsufficientStorage`` naming what was being stored, after
the partial write is removed (the caller discards the blobs it had created).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InsufficientStorage, is_out_of_space

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(entries: Iterable[tuple[str, str]]) -> str:
    """One hash for a whole folder: sha256 over its sorted (path, file sha256) pairs."""
    digest = hashlib.sha256()
    for path, sha in sorted(entries):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def out_of_space_as(what: str) -> Iterator[None]:
    """A full disk inside the block becomes ``InsufficientStorage`` saying ``what`` could not be written."""
    try:
        yield
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        raise InsufficientStorage(
            f"the disk holding the artifact store is full: {what} failed ({exc.strerror}); nothing was kept: "
            "free space and try again"
        ) from exc


@dataclass
class IngestResult:
    """What one ingest added: the file table, and the blobs that did not exist before (for rollback)."""

    files: list[tuple[str, str, int]] = field(default_factory=list)  # (relpath, sha256, size)
    new_blobs: list[str] = field(default_factory=list)
    stamps: dict[str, int] = field(default_factory=dict)  # new blob -> its mtime (ns) as created


@dataclass
class Damage:
    path: str
    sha256: str
    problem: str  # "missing" or "hash mismatch (now <sha>)"


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.experts = root / "experts"
        self.tmp = root / "tmp"

    def ensure(self) -> None:
        for d in (self.blobs, self.experts, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def expert_dir(self, expert_id: uuid.UUID | str) -> Path:
        return self.experts / str(expert_id)

    def staging_dir(self) -> Path:
        """A fresh private folder under the store's tmp/ (same filesystem, so renames are atomic)."""
        with out_of_space_as("creating a staging folder"):
            self.ensure()
            path = self.tmp / f"stage-{uuid.uuid4().hex}"
            path.mkdir()
        return path

    # -- writing -------------------------------------------------------------------------------------
    def put_file(self, source: Path) -> tuple[str, int, bool]:
        """Copy ``source`` into the store while hashing it. Returns (sha256, size, created): ``created`` for
        exactly one of any number of processes storing the same bytes at once."""
        self.ensure()
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with out_of_space_as(f"storing {source.name!r}"), source.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha = digest.hexdigest()
            final = self.blob_path(sha)
            with out_of_space_as(f"storing {source.name!r}"):
                final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)  # blobs are immutable; hard links share this inode
            while True:
                try:
                    os.link(tmp, final)  # fails if the blob exists: one creator, whoever else stores it at once
                except FileExistsError:
                    try:  # reused: fresh again, so neither a sweep nor a deletion takes it (``discard_blobs``)
                        os.utime(final)
                    except FileNotFoundError:  # a deletion took it in between: store it after all
                        continue
                    return sha, size, False
                fsync_dir(final.parent)
                return sha, size, True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def ingest_folder(self, folder: Path, relpaths: Iterable[str]) -> IngestResult:
        result = IngestResult()
        try:
            for rel in sorted(relpaths):
                sha, size, created = self.put_file(folder / rel)
                result.files.append((rel, sha, size))
                if created:
                    result.new_blobs.append(sha)
                    result.stamps[sha] = self.blob_path(sha).stat().st_mtime_ns
        except BaseException:
            self.discard_blobs(result.new_blobs, stamps=result.stamps)
            raise
        return result

    def materialize(self, expert_id: uuid.UUID | str, files: Iterable[tuple[str, str]]) -> Path:
        """Build the expert's folder as hard links to its blobs, atomically."""
        final = self.expert_dir(expert_id)
        tmp = self.tmp / f"expert-{uuid.uuid4().hex}"
        try:
            with out_of_space_as("building the expert's folder"):
                for rel, sha in files:
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(self.blob_path(sha), target)
                    except OSError:  # no hard links here: a copy (a symlink would dangle if the blob went)
                        shutil.copyfile(self.blob_path(sha), target)
                tmp.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    # -- removing ------------------------------------------------------------------------------------
    def discard_blobs(
        self, shas: Iterable[str], *, stamps: dict[str, int] | None = None, untouched_since: float | None = None
    ) -> None:
        """Remove these blobs where nobody else uses them: not while an expert folder links one, not if it was
        reused since it was created (``stamps``: its mtime then, as ``IngestResult.stamps`` records), not if it
        was touched after ``untouched_since`` (a registration storing the same bytes touches it, and may be
        about to commit rows naming it; the start-up sweep takes what was truly left)."""
        for sha in shas:
            path = self.blob_path(sha)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_nlink > 1:
                continue
            if stamps is not None and sha in stamps and st.st_mtime_ns != stamps[sha]:
                continue
            if untouched_since is not None and st.st_mtime > untouched_since:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def remove_expert_dir(self, expert_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.expert_dir(expert_id), ignore_errors=True)

    def sweep(self, referenced: set[str], experts: set[str], *, min_age_s: float) -> list[Path]:
        """Remove what a process killed mid-write left: anything in tmp/, expert folders without a row
        (``experts`` are the ids that have one) and blobs no one refers to. Only entries untouched for
        ``min_age_s``, so another process's registration in progress is left alone. Returns what went."""
        cutoff = time.time() - min_age_s
        removed: list[Path] = []

        def stale(path: Path) -> bool:
            try:
                newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.rglob("*"))])
            except FileNotFoundError:  # gone meanwhile
                return False
            return newest <= cutoff

        candidates = [*(self.tmp.iterdir() if self.tmp.exists() else [])]
        if self.experts.exists():
            candidates += [p for p in self.experts.iterdir() if p.name not in experts]
        if self.blobs.exists():
            candidates += [p for p in self.blobs.glob("*/*") if p.name not in referenced]
        for path in candidates:
            if stale(path):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- checking ------------------------------------------------------------------------------------
    def verify(self, files: Iterable[tuple[str, str]]) -> list[Damage]:
        damage: list[Damage] = []
        for rel, sha in files:
            path = self.blob_path(sha)
            if not path.exists():
                damage.append(Damage(rel, sha, "missing"))
                continue
            actual = sha256_file(path)
            if actual != sha:
                damage.append(Damage(rel, sha, f"hash mismatch (now {actual})"))
        return damage

    def blob_count(self) -> int:
        return sum(1 for _ in self.blobs.glob("*/*")) if self.blobs.exists() else 0

    def leftovers(self) -> list[Path]:
        """Anything in tmp/: evidence of an operation that did not clean up after itself."""
        return sorted(self.tmp.iterdir()) if self.tmp.exists() else []
