"""Staging untrusted input for expert registration: uploaded files, archives, server-side import paths.

Every name and byte handled here may come from an attacker. Archive member names and types are
checked before anything is written, sizes are bounded both as declared and as actually written,
and a failure leaves nothing half-extracted behind.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from registry.errors import Forbidden, PayloadTooLarge, ValidationFailed

__all__ = ["check_member_path", "copy_stream_limited", "extract_archive", "resolve_import_path"]

_CHUNK = 1024 * 1024
# "C:", "C:\x" and drive-relative "C:x" all leave the extraction folder on Windows tooling.
_DRIVE = re.compile(r"^[A-Za-z]:")
# Bounds the member list kept in memory: headers of empty tar members compress to almost nothing.
DEFAULT_MAX_MEMBERS = 10_000
# What broken archive bytes raise while listing or reading; bz2 reports bad data as a bare OSError
# and zipfile an unsupported compression method as NotImplementedError.
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
    NotImplementedError,
    RuntimeError,
)


class _LimitExceeded(Exception):
    """The source held more bytes than the budget allowed."""


class _SourceBroken(Exception):
    """Reading the source failed in a way that means its bytes are bad."""


def _member_parts(name: str, param: str) -> tuple[str, ...]:
    """Validate a member name and return its clean components (empty for "." or "./")."""
    if not name:
        raise ValidationFailed("the path is empty", param=param)
    if "\x00" in name:
        raise ValidationFailed(f"the path {name!r} contains a NUL byte", param=param)
    # Archives made on Windows use backslashes; treat them as separators so "a\..\x" cannot hide.
    normalised = name.replace("\\", "/")
    if normalised.startswith("/"):
        raise ValidationFailed(f"the path {name!r} is absolute; only relative paths are allowed", param=param)
    if _DRIVE.match(normalised):
        raise ValidationFailed(
            f"the path {name!r} starts with a Windows drive; only relative paths are allowed", param=param
        )
    parts: list[str] = []
    for part in normalised.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise ValidationFailed(f"the path {name!r} contains a '..' component", param=param)
        parts.append(part)
    return tuple(parts)


def check_member_path(name: str, *, param: str) -> PurePosixPath:
    """Return ``name`` as a clean relative path, or refuse it (absolute, ``..``, NUL, empty)."""
    parts = _member_parts(name, param)
    if not parts:
        raise ValidationFailed(f"the path {name!r} does not name anything below the folder", param=param)
    return PurePosixPath(*parts)


def _copy_bounded(
    src: IO[bytes],
    dst: IO[bytes],
    budget: int,
    *,
    read_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Copy ``src`` to ``dst`` until EOF, writing at most ``budget`` bytes; return the count.

    Reads at most one byte past the budget, so an endless or lying source costs little.
    """
    copied = 0
    while True:
        want = min(_CHUNK, budget - copied + 1)
        try:
            chunk = src.read(want)
        except read_errors as exc:
            raise _SourceBroken(str(exc)) from exc
        if not chunk:
            return copied
        if copied + len(chunk) > budget:
            raise _LimitExceeded
        dst.write(chunk)
        copied += len(chunk)


def copy_stream_limited(src: IO[bytes], dst_path: Path, *, limit: int, param: str) -> int:
    """Write an uploaded stream to ``dst_path``, refusing more than ``limit`` bytes.

    An existing regular file at ``dst_path`` (e.g. from ``mkstemp``) is overwritten; a symlink there
    is refused by the OS. On any failure the partial file is removed. Returns the bytes written.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    dst_path = Path(dst_path)
    # O_NOFOLLOW: a link planted at the staging path must not redirect the write.
    fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            return _copy_bounded(src, out, limit)
    except _LimitExceeded:
        dst_path.unlink(missing_ok=True)
        raise PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes", param=param) from None
    except BaseException:
        dst_path.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Entry:
    """One archive member that passed the name and type checks."""

    name: str  # as stored in the archive, for messages
    parts: tuple[str, ...]
    is_dir: bool
    size: int  # declared, not trusted
    open: Callable[[], IO[bytes]]


def _entry_parts(name: str, is_dir: bool, param: str) -> tuple[str, ...]:
    # A folder entry may be the archive root itself ("./" from `tar -C dir .`): harmless, kept empty.
    return _member_parts(name, param) if is_dir else check_member_path(name, param=param).parts


def _no_reader() -> IO[bytes]:
    raise AssertionError("directories are never read")


class _Budget:
    """Running checks shared by zip and tar listing: member count and declared bytes."""

    def __init__(self, archive: Path, param: str, max_bytes: int, max_members: int) -> None:
        self.archive, self.param = archive, param
        self.max_bytes, self.max_members = max_bytes, max_members
        self.members = 0
        self.declared = 0

    def add(self, name: str, size: int) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ValidationFailed(
                f"archive {self.archive.name!r} has more than {self.max_members} members", param=self.param
            )
        if size < 0:
            raise ValidationFailed(f"archive member {name!r} declares a negative size", param=f"{self.param}[{name}]")
        # Checked as we go so a huge member is refused before the reader skips over its data.
        self.declared += size
        if self.declared > self.max_bytes:
            raise PayloadTooLarge(
                f"archive {self.archive.name!r} unpacks to more than the limit of {self.max_bytes} bytes",
                param=self.param,
            )


def _zip_entries(zf: zipfile.ZipFile, budget: _Budget, param: str) -> list[_Entry]:
    entries: list[_Entry] = []
    for info in zf.infolist():
        name = info.filename
        member_param = f"{param}[{name}]"
        # Unix zips keep st_mode in the high 16 bits of the external attributes.
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        parts = _entry_parts(name, is_dir, member_param)
        if stat.S_ISLNK(mode):
            raise ValidationFailed(
                f"archive member {name!r} is a symbolic link; links are not allowed", param=member_param
            )
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ValidationFailed(
                f"archive member {name!r} is a special file (device, fifo or socket); only regular files "
                "and folders are allowed",
                param=member_param,
            )
        if info.flag_bits & 0x1:
            raise ValidationFailed(f"archive member {name!r} is encrypted", param=member_param)
        size = 0 if is_dir else info.file_size
        budget.add(name, size)

        def reader(info: zipfile.ZipInfo = info) -> IO[bytes]:
            return zf.open(info)

        entries.append(_Entry(name, parts, is_dir, size, _no_reader if is_dir else reader))
    return entries


def _tar_kind(member: tarfile.TarInfo) -> str | None:
    """Why a tar member may not be extracted, or None when it is a regular file or folder."""
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return "is a symbolic link; links are not allowed"
    if member.islnk():
        return "is a hard link; links are not allowed"
    if member.ischr() or member.isblk():
        return "is a device file; only regular files and folders are allowed"
    if member.isfifo():
        return "is a fifo; only regular files and folders are allowed"
    return f"has unsupported type {member.type!r}; only regular files and folders are allowed"


def _tar_entries(tf: tarfile.TarFile, budget: _Budget, param: str) -> list[_Entry]:
    entries: list[_Entry] = []
    # Iterating (not getmembers) stops reading as soon as a member is refused.
    for member in tf:
        name = member.name
        member_param = f"{param}[{name}]"
        is_dir = member.isdir()
        parts = _entry_parts(name, is_dir, member_param)
        reason = _tar_kind(member)
        if reason is not None:
            raise ValidationFailed(f"archive member {name!r} {reason}", param=member_param)
        size = 0 if is_dir else member.size
        budget.add(name, size)

        def reader(member: tarfile.TarInfo = member) -> IO[bytes]:
            stream = tf.extractfile(member)
            if stream is None:  # only for non-regular members, which were refused above
                raise tarfile.ReadError(f"no data for {member.name!r}")
            return stream

        entries.append(_Entry(name, parts, is_dir, size, _no_reader if is_dir else reader))
    return entries


def _plan(entries: list[_Entry], archive: Path, param: str) -> list[tuple[tuple[str, ...], _Entry]]:
    """Decide where each file goes: strip a single top folder, refuse duplicates and clashes."""
    files = [entry for entry in entries if not entry.is_dir]
    dirs = [entry for entry in entries if entry.is_dir and entry.parts]
    if not files:
        raise ValidationFailed(f"archive {archive.name!r} contains no files", param=param)
    top = files[0].parts[0]
    single_top = all(len(e.parts) >= 2 and e.parts[0] == top for e in files) and all(e.parts[0] == top for e in dirs)
    strip = 1 if single_top else 0

    targets: dict[tuple[str, ...], _Entry] = {}
    folders: set[tuple[str, ...]] = set()
    for entry in files:
        rel = entry.parts[strip:]
        if rel in targets:
            raise ValidationFailed(
                f"archive {archive.name!r} contains {'/'.join(rel)!r} more than once",
                param=f"{param}[{entry.name}]",
            )
        targets[rel] = entry
        folders.update(rel[:i] for i in range(1, len(rel)))
    for entry in dirs:
        rel = entry.parts[strip:]
        folders.update(rel[:i] for i in range(1, len(rel) + 1))
    for rel, entry in targets.items():
        if rel in folders:
            raise ValidationFailed(
                f"archive member {entry.name!r} is both a file and a folder", param=f"{param}[{entry.name}]"
            )
    return list(targets.items())


def _write_files(plan: list[tuple[tuple[str, ...], _Entry]], dest: Path, archive: Path, limit: int, param: str) -> int:
    written = 0
    for rel, entry in plan:
        member_param = f"{param}[{entry.name}]"
        target = dest.joinpath(*rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        # dest is new and only ever holds what we create, but never follow or reuse anything anyway.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        damaged = f"archive {archive.name!r} is damaged: member {entry.name!r} could not be read"
        with os.fdopen(fd, "wb") as out:
            # Only read-side errors mean bad input; a failing write (disk full) stays a server error.
            try:
                src = entry.open()
            except _CORRUPT_ERRORS as exc:
                raise ValidationFailed(f"{damaged} ({exc})", param=member_param) from exc
            with src:
                try:
                    written += _copy_bounded(src, out, limit - written, read_errors=_CORRUPT_ERRORS)
                except _LimitExceeded:
                    # Declared sizes fit, so the archive lied about them: the classic zip bomb.
                    raise PayloadTooLarge(
                        f"archive {archive.name!r} unpacks to more than the limit of {limit} bytes",
                        param=param,
                    ) from None
                except _SourceBroken as exc:
                    raise ValidationFailed(f"{damaged} ({exc})", param=member_param) from exc
    return written


def _open_archive(archive: Path, param: str) -> zipfile.ZipFile | tarfile.TarFile:
    """Open by content, not by file name: uploads arrive under staging names."""
    try:
        if zipfile.is_zipfile(archive):
            return zipfile.ZipFile(archive)
        if tarfile.is_tarfile(archive):
            return tarfile.open(archive, mode="r:*")
    except _CORRUPT_ERRORS as exc:
        raise ValidationFailed(f"archive {archive.name!r} is damaged ({exc})", param=param) from exc
    raise ValidationFailed(f"{archive.name!r} is not a zip or tar archive", param=param)


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    max_unpacked_bytes: int,
    param: str = "archive",
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[str]:
    """Safely unpack a zip or tar (plain, gz, bz2, xz) archive into the new folder ``dest``.

    Every member is checked before anything is written: relative names only, regular files and
    folders only, declared sizes within ``max_unpacked_bytes``. Bytes actually written are counted
    too. A single top-level folder holding everything is stripped. ``dest`` must not exist (its
    parent must); on any failure it is removed again. Returns the sorted relative paths of the files.
    """
    if max_unpacked_bytes < 0:
        raise ValueError("max_unpacked_bytes must not be negative")
    archive, dest = Path(archive), Path(dest)
    if os.path.lexists(dest):
        # Refused before anything else: cleanup on failure must never delete someone else's folder.
        raise FileExistsError(f"extraction folder {dest} already exists")
    budget = _Budget(archive, param, max_unpacked_bytes, max_members)

    with _open_archive(archive, param) as handle:
        try:
            if isinstance(handle, zipfile.ZipFile):
                entries = _zip_entries(handle, budget, param)
            else:
                entries = _tar_entries(handle, budget, param)
        except _CORRUPT_ERRORS as exc:
            raise ValidationFailed(f"archive {archive.name!r} is damaged ({exc})", param=param) from exc
        plan = _plan(entries, archive, param)

        dest.mkdir()
        try:
            _write_files(plan, dest, archive, max_unpacked_bytes, param)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return sorted("/".join(rel) for rel, _ in plan)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _refuse_escaping_links(top: Path, roots: Sequence[Path], allowed: str, param: str) -> None:
    """Walk ``top`` and refuse any symlink below it that resolves outside the roots.

    Links to folders inside the roots are walked too: whatever imports the tree would read them.
    """
    pending = [top]
    visited = {top}
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                found = list(it)
        except OSError as exc:
            raise ValidationFailed(f"cannot read {str(folder)!r}: {exc.strerror}", param=param) from exc
        for entry in found:
            if entry.is_symlink():
                real = Path(os.path.realpath(entry.path))
                if not _inside(real, roots):
                    raise Forbidden(
                        f"{entry.path!r} is a symbolic link leading outside the allowed import roots ({allowed})",
                        param=param,
                    )
                if real.is_dir() and real not in visited:
                    visited.add(real)
                    pending.append(real)
            elif entry.is_dir(follow_symlinks=False):
                # Its parent is real and it is no link, so this path is already real.
                path = Path(entry.path)
                if path not in visited:
                    visited.add(path)
                    pending.append(path)


def resolve_import_path(path: str, roots: Sequence[Path], *, param: str = "path") -> Path:
    """Resolve a server-side folder to import from, which must lie inside one of ``roots``.

    Symlinks are followed (for the path and the roots) before the check, and no symlink below the
    folder may lead outside the roots. Returns the resolved folder.
    """
    if not path:
        raise ValidationFailed("the import path is empty", param=param)
    if "\x00" in path:
        raise ValidationFailed("the import path contains a NUL byte", param=param)
    if not roots:
        raise Forbidden("importing from server paths is disabled: no import roots configured", param=param)
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    allowed = ", ".join(str(root) for root in roots)
    target = Path(os.path.realpath(path))
    # Checked before existence so that paths outside the roots cannot be probed.
    if not _inside(target, real_roots):
        raise Forbidden(f"{path!r} is outside the allowed import roots ({allowed})", param=param)
    if not target.exists():
        raise ValidationFailed(f"{path!r} does not exist", param=param)
    if not target.is_dir():
        raise ValidationFailed(f"{path!r} is not a directory", param=param)
    _refuse_escaping_links(target, real_roots, allowed, param)
    return target
