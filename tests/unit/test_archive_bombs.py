"""Archive bombs are refused with bounded memory, and member names that are not UTF-8 are a 400.

Every hostile archive is built here in code and is small on disk; each test checks the refusal (status,
``param`` "archive", the reason), that nothing was left behind, and the peak of Python's allocations while
refusing (tracemalloc): before these checks, tarfile read a pax or GNU long-name header's whole declared
data into memory (a 1 GiB allocation for a 1.5 KiB file; ``MemoryError``, a 500, for one declaring 100 GiB),
and zipfile built one ZipInfo per central-directory entry before any count was checked.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from core.errors import PayloadTooLarge, ValidationFailed
from registry.uploads import (
    DEFAULT_MAX_MEMBERS,
    MAX_TAR_HEADER_BYTES,
    MAX_TAR_HEADER_CHAIN,
    MAX_ZIP_DIRECTORY_BYTES,
    extract_archive,
)

MB = 1024 * 1024
GB = 1024 * MB
PEAK_LIMIT = 8 * MB  # what refusing may allocate; the bombs below ask for 64 MiB to 100 GiB


@pytest.fixture
def staging(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    return tmp_path / "in" / "upload.bin", tmp_path / "out"


def refuse(
    archive: Path, dest: Path, error: type[ValidationFailed] = ValidationFailed, *, limit: int = GB
) -> tuple[ValidationFailed, int]:
    """Extract, expecting ``error``; return it and the peak of traced allocations meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as caught:
            extract_archive(archive, dest, max_unpacked_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(caught.value) is error
    assert not dest.exists(), "a refused archive must leave nothing behind"
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]
    return caught.value, peak


# -- tar builders --------------------------------------------------------------------------------------


def header(name: str, size: int, kind: bytes, *, pax: dict[str, str] | None = None) -> bytes:
    """One raw 512-byte header (GNU format: base-256 sizes past 8 GiB), as a hostile tool would write it."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    if pax is not None:
        info.pax_headers = pax
        return info.tobuf(format=tarfile.PAX_FORMAT)
    return info.tobuf(format=tarfile.GNU_FORMAT)


def pax_record(key: str, value: str | bytes) -> bytes:
    body = b" " + key.encode() + b"=" + (value.encode() if isinstance(value, str) else value) + b"\n"
    size = len(body) + 1
    while len(str(size)) + len(body) != size:
        size += 1
    return str(size).encode() + body


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def regular(name: str, data: bytes) -> bytes:
    return header(name, len(data), tarfile.REGTYPE) + padded(data)


def end() -> bytes:
    return b"\0" * 1024


def gzip_stream(path: Path, parts: list[bytes | tuple[bytes, int]]) -> Path:
    """A .tar.gz of raw parts; (chunk, n) repeats a chunk n times, so a large body is never in memory."""
    with gzip.open(path, "wb", compresslevel=1) as gz:
        for part in parts:
            if isinstance(part, tuple):
                chunk, times = part
                for _ in range(times):
                    gz.write(chunk)
            else:
                gz.write(part)
    return path


# -- tar: extended headers ---------------------------------------------------------------------------


def test_pax_header_with_real_data_past_the_cap(staging: tuple[Path, Path]) -> None:
    """A pax header whose 64 MiB of data is really there (gzip makes it 64 KiB): tarfile would read it whole."""
    archive, dest = staging
    size = 64 * MB
    gzip_stream(archive, [header("././@PaxHeader", size, tarfile.XHDTYPE), (b"\0" * MB, 64), regular("a", b"x")])
    assert archive.stat().st_size < MB
    error, peak = refuse(archive, dest, PayloadTooLarge)
    assert error.status_code == 413 and error.param == "archive"
    assert f"declares {size} bytes" in error.message and str(MAX_TAR_HEADER_BYTES) in error.message
    assert peak < PEAK_LIMIT


@pytest.mark.parametrize(
    "kind",
    [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE],
    ids=["gnu-long-name", "gnu-long-link", "pax", "pax-global"],
)
@pytest.mark.parametrize("declared", [GB, 100 * GB], ids=["1GiB", "100GiB"])
def test_truncated_extended_header_declaring_a_huge_size(
    staging: tuple[Path, Path], kind: bytes, declared: int
) -> None:
    """1.5 KiB on disk: a header declaring 1 GiB (or 100 GiB) of name or pax records, then the file ends."""
    archive, dest = staging
    archive.write_bytes(header("././@LongLink", declared, kind) + b"x" * 1024)
    error, peak = refuse(archive, dest, PayloadTooLarge)
    assert error.param == "archive" and "extended tar header" in error.message
    assert peak < PEAK_LIMIT


def test_chain_of_extended_headers(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    chain = b"".join(
        header("././@LongLink", 100, tarfile.GNUTYPE_LONGNAME) + padded(b"n" * 99 + b"\0")
        for _ in range(MAX_TAR_HEADER_CHAIN + 1)
    )
    gzip_stream(archive, [chain, regular("a", b"x"), end()])
    error, _ = refuse(archive, dest)
    assert error.param == "archive" and f"more than {MAX_TAR_HEADER_CHAIN} extended tar headers" in error.message


def test_gnu_sparse_member(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    archive.write_bytes(header("sparse.bin", 0, tarfile.GNUTYPE_SPARSE) + end())
    error, _ = refuse(archive, dest)
    assert error.param == "archive" and "sparse" in error.message


def test_pax_sparse_map_read_from_the_data(staging: tuple[Path, Path]) -> None:
    """GNU sparse 1.0: the map sits in the member's data and tarfile reads it entry by entry while the data
    lasts (here 16 MiB of "1\\n", 16 KiB gzipped: 8 million entries)."""
    archive, dest = staging
    records = pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
    gzip_stream(
        archive,
        [
            header("././@PaxHeader", len(records), tarfile.XHDTYPE) + padded(records),
            header("sparse.bin", 16 * MB + 10, tarfile.REGTYPE),
            b"999999999\n",
            (b"1\n" * (MB // 2), 16),
            end(),
        ],
    )
    error, peak = refuse(archive, dest)
    assert error.param == "archive" and "sparse" in error.message
    assert peak < PEAK_LIMIT


def test_too_many_tar_members(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    gzip_stream(archive, [(regular("f", b""), DEFAULT_MAX_MEMBERS + 1), end()])
    error, peak = refuse(archive, dest)
    assert error.param == "archive" and f"more than {DEFAULT_MAX_MEMBERS} members" in error.message
    assert peak < 64 * MB  # the member list itself, 10,000 TarInfo objects


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_names_and_a_global_header_still_extract(staging: tuple[Path, Path], form: int) -> None:
    """What real tools write (GNU long names, pax records, git archive's global comment) is untouched."""
    archive, dest = staging
    long_dir = "d" * 150
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=form) as tf:
        if form == tarfile.PAX_FORMAT:
            tf.pax_headers = {"comment": "0123456789abcdef0123456789abcdef01234567"}
        for name, data in ((f"{long_dir}/config.json", b"{}"), (f"{long_dir}/é-{'n' * 120}.txt", b"text")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    archive.write_bytes(buf.getvalue())
    assert extract_archive(archive, dest, max_unpacked_bytes=MB) == ["config.json", f"é-{'n' * 120}.txt"]


# -- zip: the central directory ------------------------------------------------------------------------


def small_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config.json", b"{}")
    return buf.getvalue()


def split_zip(data: bytes) -> tuple[bytes, bytes, int, int]:
    """(local part, central directory, entries, directory offset) of a zip without a comment."""
    entries, size, offset = struct.unpack_from("<HLL", data, len(data) - 12)
    return data[:offset], data[offset : offset + size], entries, offset


def eocd(entries: int, size: int, offset: int) -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(entries, 0xFFFF), min(entries, 0xFFFF), size, offset, 0)


def zip64_end(entries: int, size: int, offset: int) -> bytes:
    """A ZIP64 end record, its locator and a classic end record deferring to it."""
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, offset + size, 1)
    return record + locator + eocd(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)


def test_zip64_end_record_declaring_ten_million_members(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    local, directory, _, offset = split_zip(small_zip())
    archive.write_bytes(local + directory + zip64_end(10_000_000, len(directory), offset))
    assert archive.stat().st_size < 1024
    error, _ = refuse(archive, dest)
    assert error.param == "archive" and "central directory declares 10000000" in error.message


def test_zip_end_record_declaring_too_many_members(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    local, directory, _, offset = split_zip(small_zip())
    archive.write_bytes(local + directory + eocd(DEFAULT_MAX_MEMBERS + 1, len(directory), offset))
    error, _ = refuse(archive, dest)
    assert f"more than {DEFAULT_MAX_MEMBERS} members" in error.message


def test_zip_directory_holding_more_members_than_it_declares(staging: tuple[Path, Path]) -> None:
    """The end record says one member; the directory holds 250,000 (14 MiB): zipfile reads entries until the
    directory's size is used up, so it would build 250,000 ZipInfo objects before any count was checked."""
    archive, dest = staging
    local, directory, _, offset = split_zip(small_zip())
    name_len = struct.unpack_from("<H", directory, 28)[0]
    entry = directory[: 46 + name_len]  # every copy points at the same local header
    many = entry * 250_000
    assert len(many) < MAX_ZIP_DIRECTORY_BYTES
    archive.write_bytes(local + many + eocd(1, len(many), offset))
    error, peak = refuse(archive, dest)
    assert error.param == "archive" and f"more than {DEFAULT_MAX_MEMBERS} members" in error.message
    assert peak < len(many) + PEAK_LIMIT  # the directory read once, nothing built from it


def test_zip_directory_larger_than_the_cap(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    local, directory, _, offset = split_zip(small_zip())
    size = MAX_ZIP_DIRECTORY_BYTES + 1
    archive.write_bytes(local + directory + eocd(1, size, offset))
    error, peak = refuse(archive, dest, PayloadTooLarge)
    assert error.status_code == 413 and error.param == "archive"
    assert f"central directory is {size} bytes" in error.message
    assert peak < PEAK_LIMIT


def test_zip_declaring_more_bytes_than_the_limit(staging: tuple[Path, Path]) -> None:
    """A ZIP64 extra field declares a 1 TiB member; the archive is a few hundred bytes."""
    archive, dest = staging
    local, directory, entries, offset = split_zip(small_zip())
    name_len = struct.unpack_from("<H", directory, 28)[0]
    extra = struct.pack("<HHQ", 0x0001, 8, 1 << 40)
    entry = bytearray(directory[: 46 + name_len])
    struct.pack_into("<L", entry, 24, 0xFFFFFFFF)  # uncompressed size: see the ZIP64 extra field
    struct.pack_into("<H", entry, 30, len(extra))
    directory = bytes(entry) + extra
    archive.write_bytes(local + directory + eocd(entries, len(directory), offset))
    error, _ = refuse(archive, dest, PayloadTooLarge, limit=GB)
    assert error.param == "archive" and f"limit of {GB} bytes" in error.message


# -- member names that are not UTF-8 -----------------------------------------------------------------


def raw_name_tar(name: bytes) -> bytes:
    block = bytearray(regular("x" * len(name), b"data")[:512])
    block[: len(name)] = name
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + padded(b"data") + end()


def test_tar_member_name_not_utf8(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    archive.write_bytes(raw_name_tar(b"model-\xff\xfe.bin"))
    error, _ = refuse(archive, dest)
    assert error.status_code == 400 and "not valid UTF-8" in error.message
    assert error.param == "archive[model-\\xff\\xfe.bin]"
    error.param.encode("utf-8")  # fit for the JSON error body


def test_pax_path_not_utf8(staging: tuple[Path, Path]) -> None:
    archive, dest = staging
    record = pax_record("path", b"model-\xff.bin")
    archive.write_bytes(
        header("././@PaxHeader", len(record), tarfile.XHDTYPE) + padded(record) + regular("plain", b"x") + end()
    )
    error, _ = refuse(archive, dest)
    assert "not valid UTF-8" in error.message and error.param == "archive[model-\\xff.bin]"


def test_zip_member_flagged_utf8_but_not(staging: tuple[Path, Path]) -> None:
    """The UTF-8 flag (bit 11) makes zipfile decode the name strictly: it raised UnicodeDecodeError, a 500."""
    archive, dest = staging
    data = bytearray(small_zip())
    for at in (data.find(b"PK\x03\x04") + 6, data.find(b"PK\x01\x02") + 8):
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | 0x800)
    name_at = data.find(b"PK\x01\x02") + 46
    data[name_at : name_at + 2] = b"\xff\xfe"
    archive.write_bytes(bytes(data))
    error, _ = refuse(archive, dest)
    assert error.param == "archive" and "not valid UTF-8" in error.message
