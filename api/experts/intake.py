"""Turn an upload (multipart form: fields + files or one archive) into a staged folder and an ExpertSpec.

Shared by the JSON API and the admin panel's registration form, so both refuse the same things.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Any

from litestar.datastructures import UploadFile

from core.errors import ValidationFailed
from core.settings import Settings
from registry.models import Expert
from registry.offload import run_to_completion
from registry.schemas import ExpertSpec, decode_strict
from registry.services import ExpertService
from registry.store import out_of_space_as
from registry.uploads import check_member_path, copy_stream_limited, extract_archive, resolve_import_path

LIST_FIELDS = ("skills", "domains", "example_prompts", "tags", "aliases", "datasets")
SCALAR_FIELDS = (
    "slug",
    "kind",
    "base",
    "version",
    "description",
    "task_description",
    "owner",
    "license",
    "source_uri",
    "base_revision",
    "chat_template",
    "tool_parser",
)


def spec_from_fields(pairs: list[tuple[str, Any]]) -> ExpertSpec:
    """Build the spec from form fields; list fields may repeat, anything unknown is refused by name."""
    data: dict[str, Any] = {}
    for name, value in pairs:
        if isinstance(value, UploadFile):
            continue
        if name in LIST_FIELDS:
            data.setdefault(name, []).extend(v for v in [str(value).strip()] if v)
        elif name in SCALAR_FIELDS:
            if name in data:
                raise ValidationFailed(f"field {name!r} given more than once", param=name)
            text = str(value).strip()
            if text:
                data[name] = int(text) if name == "version" and text.isdigit() else text
        else:
            raise ValidationFailed(f"unknown field {name!r}", param=name, code="unknown_field")
    if "slug" not in data:
        raise ValidationFailed("missing required field `slug`", param="slug")
    spec: ExpertSpec = decode_strict(data, ExpertSpec)
    return spec.validate()


async def stage_upload(pairs: list[tuple[str, Any]], stage_root: Path, *, max_unpacked_bytes: int) -> Path:
    """Write the uploaded files (``files`` parts, filename = path in the folder) or one ``archive`` part
    into ``stage_root/folder`` and return that folder."""
    folder = stage_root / "folder"
    uploads = [(name, value) for name, value in pairs if isinstance(value, UploadFile)]
    archives = [u for name, u in uploads if name == "archive"]
    files = [u for name, u in uploads if name == "files"]
    if other := [name for name, _ in uploads if name not in ("archive", "files")]:
        raise ValidationFailed(f"unknown file field {other[0]!r}: use `files` or `archive`", param=other[0])
    if archives and files:
        raise ValidationFailed("send either `files` or one `archive`, not both", param="archive")
    if len(archives) > 1:
        raise ValidationFailed("send one archive", param="archive")
    if not archives and not files:
        raise ValidationFailed(
            "no files uploaded: send the folder's files as `files` parts or an `archive`", param="files"
        )
    if archives:
        archive_path = stage_root / "upload.archive"
        # In threads, so the event loop keeps serving; cleanup (the caller's) waits for them if cancelled.
        archive = archives[0].file
        await run_to_completion(
            partial(copy_stream_limited, archive, archive_path, limit=max_unpacked_bytes, param="archive")
        )
        await run_to_completion(
            partial(extract_archive, archive_path, folder, max_unpacked_bytes=max_unpacked_bytes, param="archive")
        )
        archive_path.unlink()
        return folder
    folder.mkdir()
    seen: set[str] = set()
    budget = max_unpacked_bytes
    for upload in files:
        name = upload.filename or ""
        rel = check_member_path(name, param=f"files[{name}]")
        if str(rel) in seen:
            raise ValidationFailed(f"file {str(rel)!r} uploaded twice", param=f"files[{name}]")
        seen.add(str(rel))
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        budget -= await run_to_completion(
            partial(copy_stream_limited, upload.file, target, limit=budget, param=f"files[{name}]")
        )
    return folder


async def register_upload(experts: ExpertService, settings: Settings, pairs: list[tuple[str, Any]]) -> Expert:
    """Register an expert from form fields + uploaded files (or one archive); the staged copy is always
    removed and the uploads closed."""
    stage_root = experts.store.staging_dir()
    try:
        spec = spec_from_fields(pairs)
        with out_of_space_as("receiving the upload"):
            folder = await stage_upload(pairs, stage_root, max_unpacked_bytes=settings.max_unpacked_bytes)
        return await experts.register_folder(folder, spec, source_uri=f"upload:{spec.slug}")
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
        for _, value in pairs:
            if hasattr(value, "close"):
                await value.close()


async def register_import(experts: ExpertService, settings: Settings, path: str, spec: ExpertSpec) -> Expert:
    """Register a folder that already lies under one of the configured import roots."""
    folder = resolve_import_path(path, settings.import_roots, param="path")
    return await experts.register_folder(folder, spec, source_uri=f"file://{folder}")
