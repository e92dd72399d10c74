"""Untrusted input staging: member names, archive extraction, import paths, bounded uploads.

Every archive is built here in code. Every refusal also checks that nothing was left behind.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from core.errors import Forbidden, MoergeError, PayloadTooLarge, ValidationFailed
from registry.uploads import check_member_path, copy_stream_limited, extract_archive, resolve_import_path

MB = 1024 * 1024
ADAPTER = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": b"\x00" * 64,
    "extra/README.md": b"notes",
}
TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}


# -- archive builders --------------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes], *, folders: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for folder in folders:
            zf.writestr(zipfile.ZipInfo(folder.rstrip("/") + "/"), b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def tar_special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def make_tar_from(path: Path, members: dict[str, bytes], mode: str = "w:gz", *, folders: tuple[str, ...] = ()) -> Path:
    entries = []
    for folder in folders:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        entries.append((info, b""))
    entries += [tar_file(name, data) for name, data in members.items()]
    return make_tar(path, entries, mode)


def make_archive(path: Path, kind: str, members: dict[str, bytes], *, folders: tuple[str, ...] = ()) -> Path:
    if kind == "zip":
        return make_zip(path, members, folders=folders)
    return make_tar_from(path, members, TAR_MODES[kind], folders=folders)


def patch_zip_entry(path: Path, name: str, *, declared_size: int | None = None, flags: int = 0) -> None:
    """Rewrite one member's headers in place, to forge what a hostile zip tool would write."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + name_len] == name.encode():
            break
        central = data.find(b"PK\x01\x02", central + 1)
    assert central != -1 and data[local : local + 4] == b"PK\x03\x04"
    # (flags, uncompressed size) sit at offsets (6, 22) in the local header and (8, 24) centrally.
    for flag_at, size_at in ((local + 6, local + 22), (central + 8, central + 24)):
        struct.pack_into("<H", data, flag_at, struct.unpack_from("<H", data, flag_at)[0] | flags)
        if declared_size is not None:
            struct.pack_into("<I", data, size_at, declared_size)
    path.write_bytes(bytes(data))


@pytest.fixture
def staging(tmp_path: Path) -> tuple[Path, Path]:
    """(archive path, destination) — the archive is named without an extension: detection is by content."""
    (tmp_path / "in").mkdir()
    return tmp_path / "in" / "upload.bin", tmp_path / "out"


def refused(archive: Path, dest: Path, error: type[ValidationFailed], limit: int = 10 * MB) -> ValidationFailed:
    with pytest.raises(error) as caught:
        extract_archive(archive, dest, max_unpacked_bytes=limit)
    assert not dest.exists(), "a refused archive must leave nothing behind"
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]
    return caught.value


# -- check_member_path -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", "a.txt"),
        ("dir/a.txt", "dir/a.txt"),
        ("./dir/./a.txt", "dir/a.txt"),
        ("dir//a.txt", "dir/a.txt"),
        ("dir\\sub\\a.txt", "dir/sub/a.txt"),
        ("dir/", "dir"),
        ("..a/b..", "..a/b.."),
    ],
)
def test_member_path_is_cleaned(name: str, expected: str) -> None:
    assert check_member_path(name, param="f") == PurePosixPath(expected)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        (".", "does not name"),
        ("./", "does not name"),
        ("/etc/passwd", "absolute"),
        ("\\windows\\system32", "absolute"),
        ("\\\\server\\share\\x", "absolute"),
        ("C:\\evil.txt", "drive"),
        ("c:/evil.txt", "drive"),
        ("C:evil.txt", "drive"),
        ("../evil.txt", ".."),
        ("a/../../evil.txt", ".."),
        ("a/..", ".."),
        ("a\\..\\..\\evil.txt", ".."),
        ("a\x00b", "NUL"),
    ],
)
def test_member_path_refusals(name: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_member_path(name, param="files[3]")
    assert caught.value.param == "files[3]"
    assert reason in caught.value.message
    assert caught.value.status_code == 400


# -- extract_archive: good archives ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", *TAR_MODES])
def test_extracts_flat_archive(staging: tuple[Path, Path], kind: str) -> None:
    archive, dest = staging
    make_archive(archive, kind, ADAPTER)
    written = extract_archive(archive, dest, max_unpacked_bytes=MB)
    assert written == sorted(ADAPTER)
    for name, data in ADAPTER.items():
        assert (dest / name).read_bytes() == data


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_single_top_folder_is_stripped(staging: tuple[Path, Path], kind: str) -> None:
    archive, dest = staging
    nested = {f"adapter/{name}": data for name, data in ADAPTER.items()}
    make_archive(archive, kind, nested, folders=("adapter", "adapter/extra"))
    assert extract_archive(archive, dest, max_unpacked_bytes=MB) == sorted(ADAPTER)
    assert (dest / "adapter_config.json").read_bytes() == ADAPTER["adapter_config.json"]
    assert not (dest / "adapter").exists()


def test_tar_made_with_dot_root_is_accepted(staging: tuple[Path, Path]) -> None:
    # `tar -C adapter -czf x.tgz .` stores "./" and "./adapter_config.json".
    archive, dest = staging
    make_tar_from(archive, {f"./{n}": d for n, d in ADAPTER.items()}, folders=(".",))
    assert extract_archive(archive, dest, max_unpacked_bytes=MB) == sorted(ADAPTER)


@pytest.mark.parametrize(
    "members",
    [
        {"adapter/adapter_config.json": b"{}", "other/x.bin": b"x"},  # two top folders
        {"adapter/adapter_config.json": b"{}", "README.md": b"x"},  # a top-level file beside it
    ],
)
def test_top_folder_kept_when_not_alone(staging: tuple[Path, Path], members: dict[str, bytes]) -> None:
    archive, dest = staging
    make_zip(archive, members)
    assert extract_archive(archive, dest, max_unpacked_bytes=MB) == sorted(members)


def test_lone_file_at_top_is_not_stripped(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {"adapter_config.json": b"{}"})
    assert extract_archive(archive, dest, max_unpacked_bytes=MB) == ["adapter_config.json"]


def test_declared_size_exactly_at_limit_is_accepted(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {"a.bin": b"x" * 100, "b.bin": b"y" * 28})
    assert extract_archive(archive, dest, max_unpacked_bytes=128) == ["a.bin", "b.bin"]


# -- extract_archive: refusals -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("evil", ["../evil.txt", "adapter/../../evil.txt", "..\\evil.txt"])
def test_refuses_parent_components(staging: tuple[Path, Path], kind: str, evil: str) -> None:
    archive, dest = staging
    make_archive(archive, kind, {"adapter_config.json": b"{}", evil: b"pwned"})
    error = refused(archive, dest, ValidationFailed)
    assert error.param == f"archive[{evil}]"
    assert ".." in error.message
    assert not (archive.parent.parent / "evil.txt").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("evil", ["/tmp/evil.txt", "C:\\evil.txt", "\\evil.txt"])
def test_refuses_absolute_members(staging: tuple[Path, Path], kind: str, evil: str) -> None:
    archive, dest = staging
    make_archive(archive, kind, {"adapter_config.json": b"{}", evil: b"pwned"})
    error = refused(archive, dest, ValidationFailed)
    assert error.param == f"archive[{evil}]"


def test_refuses_tar_symlink(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_tar(archive, [tar_file("adapter_config.json", b"{}"), tar_special("w", tarfile.SYMTYPE, "/etc/passwd")])
    error = refused(archive, dest, ValidationFailed)
    assert error.param == "archive[w]"
    assert "symbolic link" in error.message


def test_refuses_zip_symlink(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("adapter_config.json", b"{}")
        link = zipfile.ZipInfo("weights.safetensors")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        zf.writestr(link, b"/etc/passwd")
    error = refused(archive, dest, ValidationFailed)
    assert error.param == "archive[weights.safetensors]"
    assert "symbolic link" in error.message


def test_refuses_tar_hardlink(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_tar(archive, [tar_file("adapter_config.json", b"{}"), tar_special("h", tarfile.LNKTYPE, "/etc/shadow")])
    error = refused(archive, dest, ValidationFailed)
    assert "hard link" in error.message


@pytest.mark.parametrize(
    ("kind", "word"),
    [(tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"), (tarfile.FIFOTYPE, "fifo")],
)
def test_refuses_tar_special_files(staging: tuple[Path, Path], kind: bytes, word: str) -> None:
    archive, dest = staging
    make_tar(archive, [tar_file("adapter_config.json", b"{}"), tar_special("dev", kind)])
    assert word in refused(archive, dest, ValidationFailed).message


def test_refuses_zip_fifo_mode(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    with zipfile.ZipFile(archive, "w") as zf:
        fifo = zipfile.ZipInfo("pipe")
        fifo.external_attr = 0o010644 << 16
        zf.writestr(fifo, b"")
    assert "special file" in refused(archive, dest, ValidationFailed).message


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_refuses_declared_size_over_limit(staging: tuple[Path, Path], kind: str) -> None:
    archive, dest = staging
    make_archive(archive, kind, {"a.bin": b"x" * 600, "b.bin": b"y" * 600})
    error = refused(archive, dest, PayloadTooLarge, limit=1000)
    assert error.status_code == 413
    assert error.param == "archive"
    assert "upload.bin" in error.message and "1000 bytes" in error.message


def test_refuses_zip_of_zeros_over_limit(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {"zeros.bin": bytes(2 * MB)})
    assert archive.stat().st_size < 10_000  # compresses to almost nothing: a small bomb
    error = refused(archive, dest, PayloadTooLarge, limit=MB)
    assert str(MB) in error.message


def test_refuses_zip_lying_about_sizes_and_cleans_up(staging: tuple[Path, Path]) -> None:
    # The declared-size check passes (10 bytes), the real data is 2 MB. The first member is
    # extracted before the lie shows, so this also proves that partial output is removed.
    archive, dest = staging
    make_zip(archive, {"adapter_config.json": b"{}", "zeros.bin": bytes(2 * MB)})
    patch_zip_entry(archive, "zeros.bin", declared_size=10)
    error = refused(archive, dest, ValidationFailed, limit=MB)
    assert error.param == "archive[zeros.bin]"


def test_refuses_encrypted_zip_member(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {"adapter_config.json": b"{}"})
    patch_zip_entry(archive, "adapter_config.json", flags=0x1)
    assert "encrypted" in refused(archive, dest, ValidationFailed).message


def test_refuses_truncated_tar_gz(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_tar_from(archive, {"a.bin": os.urandom(200_000), "b.bin": os.urandom(200_000)})
    archive.write_bytes(archive.read_bytes()[:250_000])
    assert "damaged" in refused(archive, dest, ValidationFailed).message


@pytest.mark.parametrize("content", [b"just some text, not an archive\n" * 40, b""])
def test_refuses_non_archive(staging: tuple[Path, Path], content: bytes) -> None:
    archive, dest = staging
    archive.write_bytes(content)
    assert "not a zip or tar archive" in refused(archive, dest, ValidationFailed).message


def test_refuses_empty_archive(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {}, folders=("adapter",))
    assert "no files" in refused(archive, dest, ValidationFailed).message


def test_refuses_duplicate_members(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_tar(archive, [tar_file("a.json", b"1"), tar_file("./a.json", b"2")])
    assert "more than once" in refused(archive, dest, ValidationFailed).message


def test_refuses_file_and_folder_clash(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {"a": b"file", "a/b": b"nested"})
    assert "both a file and a folder" in refused(archive, dest, ValidationFailed).message


def test_refuses_too_many_members(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {f"f{i}.txt": b"" for i in range(6)})
    with pytest.raises(ValidationFailed, match="more than 5 members"):
        extract_archive(archive, dest, max_unpacked_bytes=MB, max_members=5)
    assert not dest.exists()


def test_existing_destination_is_never_touched(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    make_zip(archive, {"../evil": b"x"})
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        extract_archive(archive, dest, max_unpacked_bytes=MB)
    assert (dest / "keep.txt").read_text() == "mine"


# -- copy_stream_limited -----------------------------------------------------------------------


class EndlessZeros(io.RawIOBase):
    """A client that never stops sending; records how much was pulled from it."""

    def __init__(self) -> None:
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        buffer[:] = bytes(len(buffer))
        self.served += len(buffer)
        return len(buffer)


class FailsMidway(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls > 1:
            raise ConnectionResetError("client went away")
        buffer[:10] = b"0123456789"
        return 10


def test_copy_within_limit(tmp_path: Path) -> None:
    target = tmp_path / "upload.part"
    assert copy_stream_limited(io.BytesIO(b"x" * 100), target, limit=100, param="file") == 100
    assert target.read_bytes() == b"x" * 100


def test_copy_overwrites_a_reserved_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "reserved"
    target.write_bytes(b"old contents that are longer")
    assert copy_stream_limited(io.BytesIO(b"new"), target, limit=10, param="file") == 3
    assert target.read_bytes() == b"new"


def test_copy_over_limit_removes_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "upload.part"
    with pytest.raises(PayloadTooLarge) as caught:
        copy_stream_limited(io.BytesIO(b"x" * (3 * MB)), target, limit=2 * MB + 5, param="file")
    assert caught.value.param == "file" and caught.value.status_code == 413
    assert str(2 * MB + 5) in caught.value.message
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_copy_stops_reading_an_endless_stream(tmp_path: Path) -> None:
    # The written-bytes guard: whatever a source claims, nothing past the limit is written or
    # read beyond one byte.
    source = EndlessZeros()
    target = tmp_path / "upload.part"
    with pytest.raises(PayloadTooLarge):
        copy_stream_limited(io.BufferedReader(source, buffer_size=1), target, limit=MB, param="file")
    assert source.served <= MB + 1
    assert not target.exists()


def test_copy_failure_from_client_removes_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "upload.part"
    with pytest.raises(ConnectionResetError):
        copy_stream_limited(io.BufferedReader(FailsMidway(), buffer_size=1), target, limit=MB, param="file")
    assert not target.exists()


def test_copy_refuses_symlink_at_destination(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "upload.part").symlink_to(victim)
    with pytest.raises(OSError):
        copy_stream_limited(io.BytesIO(b"x"), tmp_path / "upload.part", limit=10, param="file")
    assert victim.read_text() == "precious"


# -- resolve_import_path -----------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    roots = tmp_path / "imports"
    other_root = tmp_path / "models"
    outside = tmp_path / "private"
    for folder in (roots / "adapter" / "sub", other_root / "expert", outside / "secrets"):
        folder.mkdir(parents=True)
    (roots / "adapter" / "adapter_config.json").write_text("{}")
    (roots / "notes.txt").write_text("not a folder")
    (outside / "secrets" / "key").write_text("hunter2")
    return {"root": roots, "other": other_root, "outside": outside, "base": tmp_path}


def snapshot(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def refused_import(tree: dict[str, Path], path: Path | str, error: type[MoergeError]) -> MoergeError:
    before = snapshot(tree["base"])
    with pytest.raises(error) as caught:
        resolve_import_path(str(path), [tree["root"], tree["other"]], param="source_path")
    assert type(caught.value) is error
    assert caught.value.param == "source_path"
    assert snapshot(tree["base"]) == before, "a refused import must not change anything"
    return caught.value


def test_import_path_inside_roots(tree: dict[str, Path]) -> None:
    roots = [tree["root"], tree["other"]]
    assert resolve_import_path(str(tree["root"] / "adapter"), roots) == (tree["root"] / "adapter").resolve()
    assert resolve_import_path(str(tree["other"] / "expert"), roots) == (tree["other"] / "expert").resolve()
    # ".." that stays inside is fine once resolved.
    via_dotdot = str(tree["root"] / "adapter" / "sub" / "..")
    assert resolve_import_path(via_dotdot, roots) == tree["root"] / "adapter"


def test_import_path_with_links_inside_roots(tree: dict[str, Path]) -> None:
    # Links are followed: a link in one root to a folder in another root is allowed.
    (tree["root"] / "adapter" / "base").symlink_to(tree["other"] / "expert")
    (tree["root"] / "alias").symlink_to(tree["root"] / "adapter")
    resolved = resolve_import_path(str(tree["root"] / "alias"), [tree["root"], tree["other"]])
    assert resolved == (tree["root"] / "adapter").resolve()


def test_import_roots_given_through_a_symlink(tree: dict[str, Path]) -> None:
    link_root = tree["base"] / "root-link"
    link_root.symlink_to(tree["root"])
    assert resolve_import_path(str(tree["root"] / "adapter"), [link_root]) == tree["root"] / "adapter"


def test_import_path_outside_roots(tree: dict[str, Path]) -> None:
    error = refused_import(tree, tree["outside"] / "secrets", Forbidden)
    assert error.status_code == 403
    assert str(tree["root"]) in str(error) and str(tree["other"]) in str(error)


def test_import_path_escaping_with_dotdot(tree: dict[str, Path]) -> None:
    refused_import(tree, f"{tree['root']}/../private/secrets", Forbidden)


def test_import_path_that_is_a_link_to_outside(tree: dict[str, Path]) -> None:
    (tree["root"] / "sneaky").symlink_to(tree["outside"] / "secrets")
    refused_import(tree, tree["root"] / "sneaky", Forbidden)


def test_import_path_containing_a_link_to_outside(tree: dict[str, Path]) -> None:
    (tree["root"] / "adapter" / "sub" / "weights.safetensors").symlink_to(tree["outside"] / "secrets" / "key")
    error = refused_import(tree, tree["root"] / "adapter", Forbidden)
    assert "weights.safetensors" in str(error)


def test_import_path_escaping_through_a_linked_folder(tree: dict[str, Path]) -> None:
    # adapter/base -> models/expert (allowed), but models/expert/leak -> private: still refused.
    (tree["root"] / "adapter" / "base").symlink_to(tree["other"] / "expert")
    (tree["other"] / "expert" / "leak").symlink_to(tree["outside"])
    refused_import(tree, tree["root"] / "adapter", Forbidden)


def test_import_path_missing(tree: dict[str, Path]) -> None:
    assert "does not exist" in str(refused_import(tree, tree["root"] / "nope", ValidationFailed))


def test_import_path_missing_outside_roots_is_forbidden(tree: dict[str, Path]) -> None:
    # No probing of what exists outside the roots.
    refused_import(tree, tree["outside"] / "nope", Forbidden)


def test_import_path_not_a_directory(tree: dict[str, Path]) -> None:
    assert "not a directory" in str(refused_import(tree, tree["root"] / "notes.txt", ValidationFailed))


@pytest.mark.parametrize("path", ["", "a\x00b"])
def test_import_path_malformed(tree: dict[str, Path], path: str) -> None:
    refused_import(tree, path, ValidationFailed)


def test_import_without_roots_is_forbidden(tree: dict[str, Path]) -> None:
    with pytest.raises(Forbidden):
        resolve_import_path(str(tree["root"] / "adapter"), [])
