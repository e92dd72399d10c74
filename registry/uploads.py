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
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from core.errors import Forbidden, PayloadTooLarge, ValidationFailed

__all__ = ["check_member_path", "copy_stream_limited", "extract_archive", "resolve_import_path"]

_CHUNK = 1024 * 1024
# "C:", "C:\x" and drive-relative "C:x" all leave the extraction folder on Windows tooling.
_DRIVE = re.compile(r"^[A-Za-z]:")
# Bounds the member list kept in memory: headers of empty tar members compress to almost nothing.
DEFAULT_MAX_MEMBERS = 10_000
# tarfile reads a pax ("x", "g") or GNU long-name ("L", "K") header's data whole, at the size the header
# declares, and each such header recurses into the next one: both are capped before tarfile reads them.
MAX_TAR_HEADER_BYTES = 64 * 1024
MAX_TAR_HEADER_CHAIN = 8  # a real member has at most a global, an extended and two long-name headers
# zipfile reads the whole central directory and builds one ZipInfo per entry in it: both are checked first.
MAX_ZIP_DIRECTORY_BYTES = 16 * 1024 * 1024
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


class _Refused(Exception):
    """An archive's structure exceeds a cap; turned into a 400/413 naming the archive by extract_archive."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.too_large = reason, too_large


def _shown(name: str) -> str:
    """A member name fit for messages and ``param``: bytes that were not UTF-8 (tarfile keeps them as
    surrogates) shown as \\xNN escapes, so the JSON error body can still be encoded."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _member_parts(name: str, param: str) -> tuple[str, ...]:
    """Validate a member name and return its clean components (empty for "." or "./")."""
    if not name:
        raise ValidationFailed("the path is empty", param=param)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile decodes names with surrogateescape: their bytes were not UTF-8
        raise ValidationFailed(
            f"the path {_shown(name)!r} is not valid UTF-8", param=param, code="invalid_encoding"
        ) from None
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
        member_param = f"{param}[{_shown(name)}]"
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
        member_param = f"{param}[{_shown(name)}]"
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


# -- tar: extended headers bounded before tarfile reads them ----------------------------------------

_EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, b"X")
# tarfile's documented subclass hook ("_proc_member() can be overridden in a subclass"); looked up here so
# a Python without it fails at import rather than silently skipping the checks below.
_PROC_MEMBER: Callable[[tarfile.TarInfo, tarfile.TarFile], tarfile.TarInfo] = vars(tarfile.TarInfo)["_proc_member"]


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's own header parsing, refusing first what would make it read without bound: an extended
    header (pax, GNU long name) whose declared data exceeds MAX_TAR_HEADER_BYTES, a chain of more than
    MAX_TAR_HEADER_CHAIN of them (each recurses, holding its data), and GNU sparse members (their maps are
    read from the member's data, entry by entry, as long as it lasts)."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused("it holds a GNU sparse member, which is not supported")
        if self.type not in _EXTENDED_TYPES:
            return _PROC_MEMBER(self, tf)
        if self.size > MAX_TAR_HEADER_BYTES:
            raise _Refused(
                f"an extended tar header declares {self.size} bytes; the limit is {MAX_TAR_HEADER_BYTES}",
                too_large=True,
            )
        chain: int = getattr(tf, "_moerge_chain", 0) + 1
        if chain > MAX_TAR_HEADER_CHAIN:
            raise _Refused(f"more than {MAX_TAR_HEADER_CHAIN} extended tar headers follow each other")
        setattr(tf, "_moerge_chain", chain)  # noqa: B010 - TarFile has no such attribute in its stubs
        try:
            return _PROC_MEMBER(self, tf)
        finally:
            setattr(tf, "_moerge_chain", chain - 1)  # noqa: B010

    # pax-described sparse members (GNU formats 0.0, 0.1, 1.0): refused like the "S" type above.
    def _proc_gnusparse_00(self, *_: Any) -> None:
        raise _Refused("it holds a GNU sparse member, which is not supported")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _open_tar(archive: Path) -> tarfile.TarFile | None:
    """The archive as a (plain, gz, bz2 or xz) tar parsed with the bounds above, or None if it is not one.
    (``tarfile.is_tarfile`` would parse the first member without them.)"""
    try:
        return tarfile.open(archive, mode="r:*", tarinfo=_BoundedTarInfo)
    except tarfile.ReadError:
        return None


# -- zip: the central directory checked before zipfile loads it -------------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_ENTRY = struct.Struct("<4s24xHHH12x")  # signature, then the name, extra and comment lengths


def _zip_directory(fh: IO[bytes]) -> tuple[int, int, int] | None:
    """(declared entries, size, start) of the central directory, located as zipfile locates it: the end
    record at the very end of the file, else the last one in its final 64 KiB (after a comment), with a
    ZIP64 end record right before it when a ZIP64 locator is there. None when there is no end record."""
    size = fh.seek(0, os.SEEK_END)
    tail_start = max(0, size - _EOCD.size - 0xFFFF)
    fh.seek(tail_start)
    tail = fh.read()
    at = len(tail) - _EOCD.size
    if at < 0 or tail[at : at + 4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            return None
    _, _, _, _, entries, dir_size, _, _ = _EOCD.unpack_from(tail, at)
    end = tail_start + at
    if end >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
        fh.seek(end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
        record = fh.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
        if record[_ZIP64_EOCD.size : _ZIP64_EOCD.size + 4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            fields = _ZIP64_EOCD.unpack_from(record)
            entries, dir_size = fields[7], fields[8]
            end -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    return entries, dir_size, end - dir_size


def _check_zip_directory(archive: Path, max_members: int) -> None:
    """Refuse a zip whose central directory declares, or holds, more entries than ``max_members``, or is
    larger than MAX_ZIP_DIRECTORY_BYTES, reading no more than that cap."""
    with archive.open("rb") as fh:
        found = _zip_directory(fh)
        if found is None:
            return  # zipfile will say what is wrong
        entries, dir_size, start = found
        if entries > max_members:
            raise _Refused(f"it has more than {max_members} members (its central directory declares {entries})")
        if dir_size > MAX_ZIP_DIRECTORY_BYTES:
            raise _Refused(
                f"its central directory is {dir_size} bytes; the limit is {MAX_ZIP_DIRECTORY_BYTES}", too_large=True
            )
        if start < 0:
            return
        fh.seek(start)
        directory = fh.read(dir_size)
    # Count what is really there: zipfile reads entries until the directory's size is used up, whatever
    # the end record says.
    count = at = 0
    while at + _CENTRAL_ENTRY.size <= len(directory):
        signature, name_len, extra_len, comment_len = _CENTRAL_ENTRY.unpack_from(directory, at)
        if signature != b"PK\x01\x02":
            return  # damaged: zipfile refuses it
        count += 1
        if count > max_members:
            raise _Refused(f"it has more than {max_members} members (counted in its central directory)")
        at += _CENTRAL_ENTRY.size + name_len + extra_len + comment_len


def _open_archive(archive: Path, param: str, max_members: int) -> zipfile.ZipFile | tarfile.TarFile:
    """Open by content, not by file name: uploads arrive under staging names."""
    try:
        if zipfile.is_zipfile(archive):  # reads only the end record
            _check_zip_directory(archive, max_members)
            return zipfile.ZipFile(archive)
        if (tar := _open_tar(archive)) is not None:
            return tar
    except UnicodeDecodeError as exc:  # a zip member flagged as UTF-8 whose name is not
        raise ValidationFailed(
            f"archive {archive.name!r} has a member name that is not valid UTF-8 ({exc.reason})",
            param=param,
            code="invalid_encoding",
        ) from None
    except _CORRUPT_ERRORS as exc:
        raise ValidationFailed(f"archive {archive.name!r} is damaged ({exc})", param=param) from exc
    raise ValidationFailed(f"{archive.name!r} is not a zip or tar archive", param=param)


def _refusal(archive: Path, exc: _Refused, param: str) -> ValidationFailed:
    error = PayloadTooLarge if exc.too_large else ValidationFailed
    return error(f"archive {archive.name!r} is refused: {exc.reason}", param=param, code="archive_refused")


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

    try:
        handle = _open_archive(archive, param, max_members)
    except _Refused as exc:
        raise _refusal(archive, exc, param) from None
    with handle:
        try:
            if isinstance(handle, zipfile.ZipFile):
                entries = _zip_entries(handle, budget, param)
            else:
                entries = _tar_entries(handle, budget, param)
        except _Refused as exc:
            raise _refusal(archive, exc, param) from None
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
