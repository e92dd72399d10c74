"""Fetching an adapter's files from a moerge registry into a local cache, each checked against the registry's
sha256 manifest. Imports nothing of vLLM (nor of moerge): the resolver wraps it.

A name on the wire is an expert's slug, its id, or ``slug@<sha>`` where ``<sha>`` is a prefix (12 hex digits or
more) of its manifest's sha256: such a name is bound to the adapter's content, so a replaced expert is never served
from stale files (the old name stops resolving). The cache holds one folder per manifest sha256, written under a
temporary name and renamed when every file has been checked, so a folder that exists is whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import aiohttp

_SHA_PIN = re.compile(r"(?P<ref>[^@/]+)@(?P<sha>[0-9a-f]{12,64})")
_MANIFEST_LIMIT = 1 << 20  # bytes of a files listing: far above any adapter's
_CHUNK = 1 << 20


class FetchError(Exception):
    """The registry refused or a file did not match its manifest: nothing is cached."""


@dataclass(frozen=True)
class Manifest:
    expert_id: str
    slug: str
    kind: str
    sha256: str
    files: tuple[tuple[str, int, str], ...]  # (path, size, sha256)


@dataclass(frozen=True)
class FetchConfig:
    url: str  # moerge's base URL
    key: str  # a key with the `fetch` scope
    cache_dir: Path
    max_cache_bytes: int = 10 << 30
    timeout_s: float = 600.0


def split_name(name: str) -> tuple[str, str | None]:
    """``slug@sha`` -> (slug, sha); anything else -> (name, None)."""
    match = _SHA_PIN.fullmatch(name)
    return (match["ref"], match["sha"]) if match else (name, None)


class Fetcher:
    """Adapters from one registry, cached under ``config.cache_dir``; ``held`` folders are never evicted."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self.held: set[Path] = set()  # folders handed to the server: it may load them again at any time
        self._locks: dict[str, asyncio.Lock] = {}

    async def fetch(self, name: str) -> tuple[Manifest, Path] | None:
        """The adapter ``name`` names, its folder in the cache (downloaded if needed); None if the registry has
        no such adapter (or the name is pinned to other content)."""
        ref, pinned = split_name(name)
        headers = {"authorization": f"Bearer {self.config.key}"}
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s, sock_connect=10)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, trust_env=False) as http:
            manifest = await self._manifest(http, ref)
            if manifest is None or manifest.kind not in ("adapter", "merged"):
                return None
            if pinned is not None and not manifest.sha256.startswith(pinned):
                return None  # the name is bound to content this expert no longer has
            lock = self._locks.setdefault(manifest.sha256, asyncio.Lock())
            async with lock:
                folder = self.config.cache_dir / manifest.sha256
                if not folder.is_dir():
                    await self._download(http, manifest, folder)
        os.utime(folder)  # recently used: evicted last
        self.held.add(folder)
        self.evict()
        return manifest, folder

    async def _manifest(self, http: aiohttp.ClientSession, ref: str) -> Manifest | None:
        url = f"{self.config.url}/api/experts/{urllib.parse.quote(ref, safe='')}/files"
        async with http.get(url) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise FetchError(f"GET {url}: HTTP {resp.status}")
            body = await resp.content.read(_MANIFEST_LIMIT + 1)
        if len(body) > _MANIFEST_LIMIT:
            raise FetchError(f"GET {url}: the listing is larger than {_MANIFEST_LIMIT} bytes")
        data = json.loads(body)
        files = tuple((str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"])
        for path, _, _ in files:
            parts = Path(path).parts
            if Path(path).is_absolute() or ".." in parts or not parts:
                raise FetchError(f"the manifest names an unsafe path {path!r}")
        return Manifest(str(data["id"]), str(data["slug"]), str(data["kind"]), str(data["manifest_sha256"]), files)

    async def _download(self, http: aiohttp.ClientSession, manifest: Manifest, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{manifest.sha256}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            for path, size, sha in manifest.files:
                target = tmp / path
                target.parent.mkdir(parents=True, exist_ok=True)
                url = f"{self.config.url}/api/experts/{manifest.expert_id}/files/{urllib.parse.quote(path)}"
                digest, written = hashlib.sha256(), 0
                async with http.get(url) as resp:
                    if resp.status != 200:
                        raise FetchError(f"GET {url}: HTTP {resp.status}")
                    with target.open("wb") as out:
                        async for chunk in resp.content.iter_chunked(_CHUNK):
                            written += len(chunk)
                            if written > size:
                                raise FetchError(f"{path}: more bytes than the manifest's {size}")
                            digest.update(chunk)
                            out.write(chunk)
                if written != size or digest.hexdigest() != sha:
                    raise FetchError(f"{path}: its bytes do not match the registry's sha256 manifest; refused")
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def evict(self) -> None:
        """Remove the least recently used folders not held until the cache fits its bound."""
        root = self.config.cache_dir
        if not root.is_dir():
            return
        folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        total = sum(sizes.values())
        for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
            if total <= self.config.max_cache_bytes:
                return
            if folder in self.held:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
