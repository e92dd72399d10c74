"""Safetensors in and out without holding a model in memory.

``SafetensorsReader`` maps a folder's ``.safetensors`` files (copy-on-write, so tensors can be built on
the mapping without a copy and without a read-only warning) and hands out one tensor at a time as a view
of the mapping; ``release`` tells the kernel the pages are no longer needed, so the resident set stays at
the tensors in flight, not at everything read so far.

``ShardWriter`` knows every output tensor's name, dtype and shape before the first is computed (they are
the inputs'), so it lays out the shards and writes their headers up front; each tensor is then written at
its offset with ``pwrite`` as soon as it is ready, from any thread, in any order.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from registry.inspect import data_start, read_safetensors_header

# safetensors dtype names <-> torch dtypes (the ones models are stored in).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}
NAME_TO_TORCH: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class _Entry:
    file: int  # index into the reader's mappings
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsReader:
    """All ``.safetensors`` files of a folder (or one file), memory-mapped; tensors by name."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._maps: list[mmap.mmap] = []
        self._entries: dict[str, _Entry] = {}
        try:
            for index, path in enumerate(paths):
                header = read_safetensors_header(path, param=f"files[{path.name}]")
                base = data_start(path)
                with path.open("rb") as fh:
                    self._maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY))
                for name, info in header.items():
                    begin, finish = info.data_offsets
                    self._entries[name] = _Entry(
                        index, ST_TO_TORCH[info.dtype], info.shape, base + begin, base + finish
                    )
        except BaseException:
            self.close()
            raise

    @classmethod
    def folder(cls, folder: Path) -> SafetensorsReader:
        return cls(sorted(Path(folder).glob("*.safetensors")))

    def alias(self, name: str, stored: str) -> None:
        """Serve ``name`` from the bytes of ``stored`` (a tied weight saved once)."""
        self._entries[name] = self._entries[stored]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """A view of the mapped bytes (no copy); do not write into it."""
        entry = self._entries[name]
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._maps[entry.file], dtype=entry.dtype, count=count, offset=entry.start)
        return flat.view(entry.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they come back from the file if read again)."""
        entry = self._entries[name]
        first = -(-entry.start // _PAGE) * _PAGE  # whole pages inside the tensor only
        last = entry.end // _PAGE * _PAGE
        if last > first:
            self._maps[entry.file].madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        for mapping in self._maps:
            with contextlib.suppress(BufferError):  # a tensor still views it; it goes when that tensor does
                mapping.close()
        self._maps.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Write known tensors into shards of at most ``max_shard_bytes`` (one file if they fit)."""

    def __init__(
        self,
        folder: Path,
        specs: Iterable[TensorSpec],
        *,
        max_shard_bytes: int = 2 * 1024**3,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self._specs = {s.name: s for s in specs}
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in self._specs.values():
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        count = len(shards)
        self.files = (
            [f"{prefix}.safetensors"]
            if count == 1
            else [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self._fds: list[int] = []
        self._pending = set(self._specs)
        try:
            for index, (file_name, members) in enumerate(zip(self.files, shards, strict=True)):
                header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
                offset = 0
                for spec in members:
                    header[spec.name] = {
                        "dtype": TORCH_TO_ST[spec.dtype],
                        "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes],
                    }
                    offset += spec.nbytes
                encoded = json.dumps(header, separators=(",", ":")).encode()
                encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes, as safetensors writes it
                fd = os.open(self.folder / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.write(fd, struct.pack("<Q", len(encoded)) + encoded)
                data_start = 8 + len(encoded)
                os.ftruncate(fd, data_start + offset)
                for spec in members:
                    start = header[spec.name]["data_offsets"][0]  # type: ignore[index]
                    self._where[spec.name] = (index, data_start + start)
        except BaseException:
            self._close_fds()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (any thread); its dtype and shape must be the announced ones."""
        spec = self._specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, announced {spec.dtype} {spec.shape}")
        shard, offset = self._where[name]
        data = memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        while data:  # pwrite may write less than asked
            written = os.pwrite(self._fds[shard], data, offset)
            data, offset = data[written:], offset + written
        self._pending.discard(name)

    def finish(self) -> dict[str, object]:
        """fsync and close; write the index when sharded. Returns {"files", "total_size"}."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors were never written, e.g. {sorted(self._pending)[0]}")
        for fd in self._fds:
            os.fsync(fd)
        self._close_fds()
        total = sum(s.nbytes for s in self._specs.values())
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {name: self.files[shard] for name, (shard, _) in self._where.items()},
            }
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return {"files": list(self.files), "total_size": total}

    def abort(self) -> None:
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
