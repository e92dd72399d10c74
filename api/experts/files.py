"""/api/experts/{ref}/files: an expert's files for machines that serve it elsewhere (vLLM servers with moerge's
LoRA resolver), under the `fetch` scope (which can read expert files and nothing else; admin can too).

The listing is the registry's sha256 manifest; a file is served from the content-addressed store with its sha256
as a strong ETag (``If-None-Match`` answers 304) and a single byte range (``Range: bytes=a-b``, ``a-`` or ``-n``)
answers 206, or 416 when it starts past the end. A Range header that is malformed or asks for several ranges is
ignored (the whole file, 200), as RFC 9110 allows.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.response import Stream

from api.deps import provide_expert_service
from api.security import require_fetch
from core.errors import NotFound
from registry.services import ExpertService

CHUNK_BYTES = 1 << 20
MAX_RANGE_HEADER = 200  # longer than any single range of a file this size could need: ignored, not parsed
_SINGLE_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


class ExpertFileOut(msgspec.Struct):
    path: str
    size: int
    sha256: str


class ExpertFilesOut(msgspec.Struct):
    """An expert's files as the registry recorded them: what a fetcher checks each download against."""

    id: str
    slug: str
    kind: str
    manifest_sha256: str
    files: list[ExpertFileOut]


class ExpertFilesController(Controller):
    path = "/api/experts/{ref:str}/files"
    tags = ["experts"]
    guards = [require_fetch]
    dependencies = {"experts": Provide(provide_expert_service, sync_to_thread=False)}

    @get("/")
    async def list_files(self, ref: FromPath[str], experts: NamedDependency[ExpertService]) -> ExpertFilesOut:
        expert = await experts.get(ref)
        return ExpertFilesOut(
            id=str(expert.id),
            slug=expert.slug,
            kind=expert.kind,
            manifest_sha256=expert.manifest_sha256,
            files=[ExpertFileOut(path=f.path, size=f.size, sha256=f.sha256) for f in expert.files],
        )

    # Response[Any]: the file's bytes (application/octet-stream), whole, a 206 range, a 304 or a 416.
    @get("/{name:path}")
    async def get_file(
        self,
        ref: FromPath[str],
        name: FromPath[Path],
        request: Request[Any, Any, Any],
        experts: NamedDependency[ExpertService],
    ) -> Response[Any]:
        expert = await experts.get(ref)
        wanted = str(name).lstrip("/")
        record = next((f for f in expert.files if f.path == wanted), None)
        if record is None:  # only manifest names: never a path built from the request
            raise NotFound(f"expert {expert.slug!r} has no file {wanted!r}", param="name", code="file_not_found")
        blob = experts.store.blob_path(record.sha256)
        await experts.session.close()  # no connection held while the bytes go out
        etag = f'"{record.sha256}"'
        headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": "private, max-age=0"}
        if etag in (request.headers.get("if-none-match") or ""):
            return Response(b"", status_code=304, headers=headers)
        size = record.size
        try:
            span = _requested_span(request.headers.get("range"), size)
        except _Unsatisfiable:
            return Response(b"", status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
        start, end = span if span is not None else (0, size - 1)
        status = 200 if span is None else 206
        if status == 206:
            headers["content-range"] = f"bytes {start}-{end}/{size}"
        headers["content-length"] = str(max(0, end - start + 1))
        return Stream(
            _read(blob, start, end + 1),
            status_code=status,
            media_type="application/octet-stream",
            headers=headers,
        )


class _Unsatisfiable(Exception):
    """The range starts past the file's end (or asks for its last 0 bytes): a 416."""


def _requested_span(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a Range header asks for; None to send everything; ``_Unsatisfiable`` for a 416."""
    if not header or len(header) > MAX_RANGE_HEADER:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None  # malformed, or several ranges: the whole file
    first, last = match.group(1), match.group(2)
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size:
        raise _Unsatisfiable
    if end < start:
        return None
    return start, end


async def _read(path: Path, start: int, stop: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as handle:
        await handle.seek(start)
        left = stop - start
        while left > 0:
            chunk = await handle.read(min(CHUNK_BYTES, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
