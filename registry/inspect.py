"""Inspection of a local model folder (HF model or PEFT LoRA adapter) before it is registered.

Only safetensors *headers* are read, never tensor data: a header states every tensor's dtype, shape and
byte range, which is enough to check that the file is whole and that an adapter or finetune fits its
base. Every refusal is a ``ValidationFailed`` naming the field the client sent and the reason.
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import json
import math
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from core.errors import ValidationFailed
from core.lora import PEFT_PREFIX, pattern_value
from registry.documents import load_yaml
from registry.limits import MAX_LORA_RANK, first_lora_fault

__all__ = [
    "FORBIDDEN_SUFFIXES",
    "PEFT_PREFIX",
    "FolderInspection",
    "TensorInfo",
    "adapter_module_shapes",
    "check_adapter_fits_base",
    "check_file_names",
    "check_finetune_fits_base",
    "inspect_folder",
    "pattern_value",
    "read_safetensors_header",
]

FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# A header is a small JSON index; anything larger is an attack or garbage, not a model.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# All headers of one folder together: many shards each near MAX_HEADER_BYTES would otherwise add up. The largest
# real checkpoints' headers (tens of thousands of tensors over a hundred shards) total a few tens of MiB.
MAX_HEADERS_TOTAL_BYTES = 100 * 1024 * 1024
# Config-like files are read whole; bound them so a hostile upload cannot exhaust memory.
MAX_DOC_BYTES = 64 * 1024 * 1024
# Widths of the registry columns these land in (registry/models.py): longer is refused, not truncated.
_MAX_ARCHITECTURE_CHARS = 128
_MAX_DTYPE_CHARS = 32
_MAX_LICENSE_CHARS = 64
# What no database text holds: NUL (PostgreSQL refuses it) and unpaired surrogates (not encodable as UTF-8),
# which JSON and YAML escapes (\u0000, \ud800) produce from valid UTF-8 files.
_SURROGATE = re.compile("[\ud800-\udfff]")

# Bits per element of every dtype the safetensors format defines (sub-byte floats included).
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

# Floating dtypes as torch names them; these are the ones a model's "dtype" can be inferred from.
_TORCH_FLOAT_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}

# Fixed order so the same tokenizer always hashes the same; the first present of the first pair wins.
_TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model")
_TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json")

_INDEX_FILE = "model.safetensors.index.json"

# Leaf names of input/output embedding layers: PEFT may save these whole (resized vocab, LoRA on them).
_EMBEDDING_LEAVES = frozenset(
    {"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "shared", "tok_embeddings"}
)
# Where a tied model keeps the matrix that serves as lm_head.
_TIED_EMBEDDING_SUFFIXES = tuple(f"{leaf}.weight" for leaf in sorted(_EMBEDDING_LEAVES - {"lm_head"}))

_LORA_LINEAR_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$")
_LORA_EMBED_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_LORA_MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(?P<yaml>.*?)^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    # [begin, end) in the file's data area (after the 8-byte length and the header)
    data_offsets: tuple[int, int] = field(default=(0, 0), compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class FolderInspection:
    kind: Literal["model", "adapter"]
    files: list[tuple[str, int]]
    config: dict[str, Any] | None
    adapter_config: dict[str, Any] | None
    tensors: dict[str, TensorInfo]
    architecture: str | None
    dtype: str | None
    tokenizer_hash: str | None
    param_count: int
    # Sum of the sizes of all files in the folder, in bytes.
    total_size: int
    # Which .safetensors file holds each tensor, so errors can name the file.
    tensor_files: dict[str, str] = field(default_factory=dict)
    peft_type: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    card_metadata: dict[str, Any] = field(default_factory=dict)
    card_body: str | None = None


# -- safetensors headers -----------------------------------------------------------------------------


def _fmt_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys silently; a header naming a tensor twice is corrupt.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_nonneg_int(value: Any) -> bool:
    # bool is an int subclass in Python but never a valid dimension or offset.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: Any, *, param: str) -> tuple[TensorInfo, int, int]:
    def bad(reason: str) -> ValidationFailed:
        return ValidationFailed(f"corrupt safetensors header: tensor {name!r} {reason}", param=param)

    if not isinstance(entry, dict):
        raise bad("is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise bad(f"has unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise bad("has a shape that is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_nonneg_int(o) for o in offsets)):
        raise bad("has data_offsets that are not [begin, end] non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"has data_offsets [{begin}, {end}] that end before they begin")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise bad(f"spans {end - begin} bytes but {dtype} {_fmt_shape(shape)} needs {bits / 8:g}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), data_offsets=(begin, end)), begin, end


def read_safetensors_header(path: Path, *, param: str) -> dict[str, TensorInfo]:
    """Read and fully validate the header of a safetensors file without touching tensor data.

    The data area starts at ``data_start(path)``; each TensorInfo's ``data_offsets`` are relative to it."""
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValidationFailed(
                f"corrupt safetensors header: file is {file_size} bytes, shorter than the 8-byte length prefix",
                param=param,
            )
        n = int.from_bytes(prefix, "little")
        if n == 0 or n > MAX_HEADER_BYTES or n > file_size - 8:
            raise ValidationFailed(
                f"corrupt safetensors header: declared header length {n} is impossible for a {file_size}-byte file",
                param=param,
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationFailed(f"corrupt safetensors header: not valid JSON ({exc})", param=param) from None
    except RecursionError:  # arrays nested thousands deep: no header nests
        raise ValidationFailed("corrupt safetensors header: nested too deeply", param=param) from None
    if not isinstance(header, dict):
        raise ValidationFailed("corrupt safetensors header: not a JSON object", param=param)

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, begin, end = _parse_entry(name, entry, param=param)
        tensors[name] = info
        spans.append((begin, end, name))

    data_size = file_size - 8 - n
    declared = max((end for _, end, _ in spans), default=0)
    if declared > data_size:
        raise ValidationFailed(
            f"truncated: header declares {declared} bytes of tensor data, file holds {data_size}", param=param
        )
    if declared < data_size:
        raise ValidationFailed(
            f"trailing garbage: header declares {declared} bytes of tensor data, file holds {data_size}",
            param=param,
        )
    # Tensors must tile the data area exactly: an overlap or a hole means the header lies.
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise ValidationFailed(f"corrupt safetensors header: tensor {name!r} {what}", param=param)
        cursor = end
    return tensors


def declared_header_length(path: Path) -> int:
    """The header length a safetensors file declares, or 0 if it declares none that could be read (which
    ``read_safetensors_header`` then refuses, saying why). Reads 8 bytes."""
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        n = int.from_bytes(fh.read(8), "little")
    return n if file_size >= 8 and 0 < n <= min(MAX_HEADER_BYTES, file_size - 8) else 0


def _check_headers_total(folder: Path, weight_files: list[str]) -> None:
    """Refuse a folder whose headers add up past MAX_HEADERS_TOTAL_BYTES before any of them is read."""
    total = 0
    for rel in weight_files:
        total += declared_header_length(folder / rel)
        if total > MAX_HEADERS_TOTAL_BYTES:
            raise ValidationFailed(
                f"the safetensors headers of this upload add up to more than "
                f"{MAX_HEADERS_TOTAL_BYTES // (1024 * 1024)} MiB by {rel} ({total} bytes)",
                param=f"files[{rel}]",
            )


def data_start(path: Path) -> int:
    """Byte offset of a safetensors file's data area (8-byte length prefix + header)."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


# -- file names and folder walk ----------------------------------------------------------------------


def check_file_names(relpaths: list[str]) -> None:
    """Refuse pickle-based checkpoints: loading them can run arbitrary code."""
    for name in relpaths:
        if name.lower().endswith(FORBIDDEN_SUFFIXES):
            raise ValidationFailed("pickle checkpoints are refused: safetensors only", param=f"files[{name}]")


def _walk(folder: Path) -> list[tuple[str, int]]:
    files: list[tuple[str, int]] = []

    def visit(directory: Path, rel: PurePosixPath | None) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                relpath = PurePosixPath(entry.name) if rel is None else rel / entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise ValidationFailed("links are refused", param=f"files[{relpath}]")
                if stat.S_ISDIR(st.st_mode):
                    visit(Path(entry.path), relpath)
                elif stat.S_ISREG(st.st_mode):
                    files.append((str(relpath), st.st_size))
                else:
                    raise ValidationFailed("only regular files are accepted", param=f"files[{relpath}]")

    visit(folder, None)
    return sorted(files)


def _read_doc(folder: Path, relpath: str) -> str:
    path = folder / relpath
    if path.stat().st_size > MAX_DOC_BYTES:
        raise ValidationFailed(
            f"{relpath} is larger than {MAX_DOC_BYTES // (1024 * 1024)} MiB", param=f"files[{relpath}]"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            f"{relpath} is not UTF-8 text (invalid byte at offset {exc.start})", param=f"files[{relpath}]"
        ) from None
    _check_text(text, relpath)
    return text


def _check_text(value: Any, relpath: str) -> None:
    """Refuse NUL and unpaired surrogates anywhere in a parsed document (keys included); iterative, so a
    deeply nested document cannot exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        # isascii() is O(1) in CPython: only non-ASCII strings are scanned for surrogates.
        elif isinstance(item, str) and ("\x00" in item or (not item.isascii() and _SURROGATE.search(item))):
            raise ValidationFailed(
                f"{relpath} holds a NUL character or an unpaired surrogate (\\u0000, \\ud800-\\udfff), "
                "which is not text",
                param=f"files[{relpath}]",
            )


def _read_json_object(folder: Path, relpath: str) -> dict[str, Any]:
    try:
        doc = json.loads(_read_doc(folder, relpath))
    except ValueError as exc:
        raise ValidationFailed(f"{relpath} is not valid JSON ({exc})", param=f"files[{relpath}]") from None
    except RecursionError:
        raise ValidationFailed(f"{relpath} is not valid JSON (nested too deeply)", param=f"files[{relpath}]") from None
    if not isinstance(doc, dict):
        raise ValidationFailed(f"{relpath} must be a JSON object", param=f"files[{relpath}]")
    _check_text(doc, relpath)
    return doc


# -- folder inspection -------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    # YAML yields dates and non-string keys; the card is stored as JSON, so normalise them here.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _parse_card(text: str) -> tuple[dict[str, Any], str]:
    param = "files[README.md]"
    match = _FRONT_MATTER_RE.match(text)
    if match is None:
        if re.match(r"\A---[ \t]*\r?\n", text):
            raise ValidationFailed("README.md front matter opened with --- is never closed", param=param)
        return {}, text
    # bounded: no anchors or aliases (billion laughs), size, depth and node count capped
    meta = load_yaml(match.group("yaml"), param=param, what="README.md front matter")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValidationFailed("README.md front matter must be a YAML mapping", param=param)
    return _jsonable(meta), text[match.end() :].lstrip("\r\n")


def _tokenizer_hash(folder: Path, names: set[str]) -> str | None:
    vocab = next((n for n in _TOKENIZER_VOCAB_FILES if n in names), None)
    if vocab is None:
        return None
    digest = hashlib.sha256()
    for name in (vocab, *(n for n in _TOKENIZER_EXTRA_FILES if n in names)):
        # Frame each file by name and length so different splits of the same bytes never collide.
        digest.update(f"{name}\0{(folder / name).stat().st_size}\0".encode())
        # The JSON ones are text every tokenizer loader decodes: check it here, chunk by chunk, while hashing.
        text = codecs.getincrementaldecoder("utf-8")() if name.endswith(".json") else None
        offset = 0
        with open(folder / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
                if text is not None:
                    try:
                        text.decode(chunk)
                    except UnicodeDecodeError as exc:
                        raise ValidationFailed(
                            f"{name} is not UTF-8 text (invalid byte at offset {offset + exc.start})",
                            param=f"files[{name}]",
                        ) from None
                offset += len(chunk)
        if text is not None:
            try:
                text.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValidationFailed(
                    f"{name} is not UTF-8 text (it ends mid-character)", param=f"files[{name}]"
                ) from None
    return digest.hexdigest()


def _config_dtype(config: dict[str, Any] | None) -> str | None:
    if not config:
        return None
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value and value != "auto":
            dtype = value.lower().removeprefix("torch.")
            if len(dtype) > _MAX_DTYPE_CHARS:
                raise ValidationFailed(
                    f"config.json: {key} is longer than {_MAX_DTYPE_CHARS} characters; not a dtype",
                    param="files[config.json]",
                )
            return dtype
    return None


def _tensor_dtype(tensors: dict[str, TensorInfo]) -> str | None:
    # Weighted by element count: a model is "bfloat16" even if a few small buffers are float32.
    counts: Counter[str] = Counter()
    for info in tensors.values():
        if info.dtype in _TORCH_FLOAT_NAMES:
            counts[_TORCH_FLOAT_NAMES[info.dtype]] += info.numel
    if not counts:
        return None
    return max(sorted(counts), key=lambda name: counts[name])


def _architecture(config: dict[str, Any] | None, relpath: str) -> str | None:
    if not config or config.get("architectures") is None:
        return None
    archs = config["architectures"]
    if not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs):
        raise ValidationFailed(f"{relpath}: architectures must be a list of names", param=f"files[{relpath}]")
    if archs and len(archs[0]) > _MAX_ARCHITECTURE_CHARS:
        raise ValidationFailed(
            f"{relpath}: architecture name longer than {_MAX_ARCHITECTURE_CHARS} characters", param=f"files[{relpath}]"
        )
    return archs[0] if archs else None


def _check_index(folder: Path, names: set[str], headers: dict[str, dict[str, TensorInfo]]) -> None:
    param = f"files[{_INDEX_FILE}]"
    index = _read_json_object(folder, _INDEX_FILE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValidationFailed(f"{_INDEX_FILE}: weight_map must map tensor names to shard files", param=param)
    for tensor, shard in weight_map.items():
        if shard not in names:
            raise ValidationFailed(f"{_INDEX_FILE}: shard {shard} (for {tensor}) is not in the folder", param=param)
        if shard not in headers:
            raise ValidationFailed(f"{_INDEX_FILE}: shard {shard} is not a .safetensors file", param=param)
        if tensor not in headers[shard]:
            raise ValidationFailed(f"{_INDEX_FILE}: tensor {tensor} is not in shard {shard}", param=param)
    for shard in set(weight_map.values()):
        for tensor in headers[shard]:
            if weight_map.get(tensor) != shard:
                raise ValidationFailed(
                    f"{_INDEX_FILE}: tensor {tensor} in shard {shard} is not listed in the index", param=param
                )


def inspect_folder(folder: Path, *, max_lora_rank: int = MAX_LORA_RANK) -> FolderInspection:
    """Validate a model or PEFT LoRA folder and describe it; reads headers and small files only.

    ``max_lora_rank``: the largest rank an adapter may declare (``MOERGE_MAX_LORA_RANK``)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise ValidationFailed(f"{folder} is not a folder", param="files")
    files = _walk(folder)
    relpaths = [rel for rel, _ in files]
    names = set(relpaths)
    check_file_names(relpaths)

    weight_files = [rel for rel in relpaths if rel.endswith(".safetensors")]
    if not weight_files:
        raise ValidationFailed("no .safetensors weights found", param="files")

    _check_headers_total(folder, weight_files)
    headers = {rel: read_safetensors_header(folder / rel, param=f"files[{rel}]") for rel in weight_files}
    tensors: dict[str, TensorInfo] = {}
    tensor_files: dict[str, str] = {}
    for rel, header in headers.items():
        for name, info in header.items():
            if name in tensors:
                raise ValidationFailed(
                    f"tensor {name} appears in both {tensor_files[name]} and {rel}", param=f"files[{rel}]"
                )
            tensors[name] = info
            tensor_files[name] = rel

    is_adapter = "adapter_config.json" in names
    config = _read_json_object(folder, "config.json") if "config.json" in names else None
    if config is None and not is_adapter:
        raise ValidationFailed("config.json is required for a model folder", param="files")

    card_metadata: dict[str, Any] = {}
    card_body: str | None = None
    if "README.md" in names:
        try:
            card_metadata, card_body = _parse_card(_read_doc(folder, "README.md"))
        except RecursionError:
            raise ValidationFailed("README.md front matter is nested too deeply", param="files[README.md]") from None
        _check_text(card_metadata, "README.md")
        license_ = card_metadata.get("license")
        if license_ is not None and len(str(license_)) > _MAX_LICENSE_CHARS:
            raise ValidationFailed(
                f"README.md: license is longer than {_MAX_LICENSE_CHARS} characters", param="files[README.md]"
            )

    insp = FolderInspection(
        kind="adapter" if is_adapter else "model",
        files=files,
        config=config,
        adapter_config=None,
        tensors=tensors,
        architecture=_architecture(config, "config.json"),
        dtype=_config_dtype(config) or _tensor_dtype(tensors),
        tokenizer_hash=_tokenizer_hash(folder, names),
        param_count=sum(info.numel for info in tensors.values()),
        total_size=sum(size for _, size in files),
        tensor_files=tensor_files,
        card_metadata=card_metadata,
        card_body=card_body,
    )
    if is_adapter:
        _fill_adapter(insp, _read_json_object(folder, "adapter_config.json"), max_lora_rank=max_lora_rank)
    elif _INDEX_FILE in names:
        _check_index(folder, names, headers)
    return insp


# -- PEFT LoRA adapters ------------------------------------------------------------------------------


@dataclass
class LoraModule:
    embedding: bool = False
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    b_bias: TensorInfo | None = None
    magnitude: TensorInfo | None = None
    keys: list[str] = field(default_factory=list)


def split_adapter_keys(tensors: dict[str, TensorInfo]) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Group LoRA tensors by base module path; return the other keys mapped to their base tensor names."""
    modules: dict[str, LoraModule] = {}
    others: dict[str, str] = {}
    for key, info in tensors.items():
        rel = key.removeprefix(PEFT_PREFIX)
        if (m := _LORA_LINEAR_RE.match(rel)) and (m["part"], m["param"]) != ("lora_A", "bias"):
            mod = modules.setdefault(m["module"], LoraModule())
            if m["param"] == "bias":
                mod.b_bias = info
            elif m["part"] == "lora_A":
                mod.a = info
            else:
                mod.b = info
        elif m := _LORA_EMBED_RE.match(rel):
            mod = modules.setdefault(m["module"], LoraModule())
            mod.embedding = True
            if m["part"] == "lora_embedding_A":
                mod.a = info
            else:
                mod.b = info
        elif m := _LORA_MAGNITUDE_RE.match(rel):
            mod = modules.setdefault(m["module"], LoraModule())
            mod.magnitude = info
        else:
            # PEFT saves a LoRA-wrapped layer's own weight under ".base_layer."; the base has it without.
            others[key] = rel.replace(".base_layer.", ".")
            continue
        mod.keys.append(key)
    return modules, others


def _lora_out_in(mod: LoraModule) -> tuple[int, int, int]:
    """(out, in, r) of B·A for a validated module."""
    assert mod.a is not None and mod.b is not None
    return mod.b.shape[0], mod.a.shape[1], mod.a.shape[0]


def _config_field(cfg: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = cfg.get(name)
    if value is None:
        return default
    # bool is an int subclass: accept it only where a bool is meant.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValidationFailed(
            f"adapter_config.json: {name} has an invalid value {value!r}", param=f"adapter_config.json:{name}"
        )
    return value


def _fill_adapter(insp: FolderInspection, cfg: dict[str, Any], *, max_lora_rank: int = MAX_LORA_RANK) -> None:
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ValidationFailed(
            f"adapter_config.json: peft_type {peft_type!r} is not supported; only LORA adapters are accepted",
            param="adapter_config.json:peft_type",
        )
    # Ranks, alphas and pattern keys before anything else reads them: the module checks below match pattern
    # keys against module names, and PEFT and vLLM later run them as regular expressions.
    fault = first_lora_fault(
        r=cfg.get("r"),
        lora_alpha=cfg.get("lora_alpha"),
        rank_pattern=cfg.get("rank_pattern"),
        alpha_pattern=cfg.get("alpha_pattern"),
        max_lora_rank=max_lora_rank,
    )
    if fault is not None:
        raise ValidationFailed(f"adapter_config.json: {fault.reason}", param=f"adapter_config.json:{fault.field}")
    r: int = cfg["r"]
    lora_alpha = _config_field(cfg, "lora_alpha", (int, float), 8)  # 8 is PEFT's default
    use_rslora = _config_field(cfg, "use_rslora", (bool,), False)
    use_dora = _config_field(cfg, "use_dora", (bool,), False)
    # Validated here; check_adapter_fits_base reads it from adapter_config to orient Conv1D weights.
    _config_field(cfg, "fan_in_fan_out", (bool,), False)
    rank_pattern: dict[str, Any] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = cfg.get("alpha_pattern") or {}
    modules_to_save = cfg.get("modules_to_save")
    if modules_to_save is not None and not (
        isinstance(modules_to_save, list) and all(isinstance(m, str) and m for m in modules_to_save)
    ):
        raise ValidationFailed(
            "adapter_config.json: modules_to_save must be a list of names", param="adapter_config.json:modules_to_save"
        )
    base_ref = cfg.get("base_model_name_or_path")
    if base_ref is not None and not isinstance(base_ref, str):
        raise ValidationFailed(
            "adapter_config.json: base_model_name_or_path must be a string",
            param="adapter_config.json:base_model_name_or_path",
        )
    bias_mode = cfg.get("bias", "none")

    modules, others = split_adapter_keys(insp.tensors)
    for key in insp.tensors:
        if not key.startswith(PEFT_PREFIX):
            raise ValidationFailed(
                f"adapter tensor {key} does not start with {PEFT_PREFIX!r}; not a PEFT LoRA checkpoint",
                param=f"files[{insp.tensor_files[key]}]",
            )
    if not modules:
        raise ValidationFailed("adapter holds no LoRA weights (lora_A / lora_B)", param="files")

    for module, mod in sorted(modules.items()):
        _check_lora_module(module, mod, insp, r=r, rank_pattern=rank_pattern, use_dora=use_dora)

    save_list = modules_to_save or []
    for key, base_name in others.items():
        module, _, leaf = base_name.rpartition(".")
        allowed = (
            any(module == m or module.endswith("." + m) for m in save_list)
            or module.rpartition(".")[2] in _EMBEDDING_LEAVES
            or (leaf == "bias" and bias_mode in ("all", "lora_only"))
        )
        if not allowed:
            raise ValidationFailed(
                f"unexpected tensor {key} in adapter: not a LoRA weight, nor listed in modules_to_save",
                param=f"files[{insp.tensor_files[key]}]",
            )

    insp.adapter_config = cfg
    insp.peft_type = "LORA"
    insp.r = r
    insp.lora_alpha = float(lora_alpha)
    insp.use_rslora = use_rslora
    insp.use_dora = use_dora
    insp.target_modules = sorted({module.rpartition(".")[2] for module in modules})
    insp.modules_to_save = list(modules_to_save) if modules_to_save is not None else None
    insp.rank_pattern = dict(rank_pattern)
    insp.alpha_pattern = dict(alpha_pattern)
    insp.base_model_name_or_path = base_ref


def _check_lora_module(
    module: str,
    mod: LoraModule,
    insp: FolderInspection,
    *,
    r: int,
    rank_pattern: dict[str, Any],
    use_dora: bool,
) -> None:
    param = f"files[{insp.tensor_files[mod.keys[0]]}]"
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if mod.embedding else ("lora_A", "lora_B")
    if mod.a is None or mod.b is None:
        missing = a_name if mod.a is None else b_name
        raise ValidationFailed(f"module {module} lacks its {missing} weight", param=param)
    if len(mod.a.shape) != 2 or len(mod.b.shape) != 2:
        raise ValidationFailed(
            f"module {module}: {a_name} {_fmt_shape(mod.a.shape)} and {b_name} {_fmt_shape(mod.b.shape)} "
            "must both be 2-D",
            param=param,
        )
    out_f, _, r_a = _lora_out_in(mod)
    r_b = mod.b.shape[1]
    if r_a != r_b:
        raise ValidationFailed(
            f"module {module}: rank mismatch, {a_name} has r={r_a}, {b_name} has r={r_b}", param=param
        )
    expected = pattern_value(rank_pattern, module)
    expected_r = expected if _is_nonneg_int(expected) else r
    if r_a != expected_r:
        raise ValidationFailed(
            f"module {module}: weights have rank {r_a} but adapter_config.json declares r={expected_r}",
            param=param,
        )
    if mod.b_bias is not None and mod.b_bias.shape != (out_f,):
        raise ValidationFailed(
            f"module {module}: lora_B bias has shape {_fmt_shape(mod.b_bias.shape)}, expected [{out_f}]",
            param=param,
        )
    if mod.magnitude is not None:
        if not use_dora:
            raise ValidationFailed(
                f"module {module} has a DoRA magnitude vector but adapter_config.json has use_dora false",
                param=param,
            )
        # Embedding DoRA norms differ in layout; only Linear magnitudes have a fixed [out] shape.
        if not mod.embedding and mod.magnitude.shape != (out_f,):
            raise ValidationFailed(
                f"module {module}: lora_magnitude_vector has shape {_fmt_shape(mod.magnitude.shape)}, "
                f"expected [{out_f}]",
                param=param,
            )
    elif use_dora and not mod.embedding:
        raise ValidationFailed(f"module {module}: use_dora is set but lora_magnitude_vector is missing", param=param)


def adapter_module_shapes(insp: FolderInspection) -> dict[str, tuple[int, int]]:
    """Base module path -> (out_features, in_features) of B·A, for every LoRA-adapted module."""
    modules, _ = split_adapter_keys(insp.tensors)
    return {
        module: _lora_out_in(mod)[:2]
        for module, mod in sorted(modules.items())
        if mod.a is not None and mod.b is not None
    }


# -- compatibility with a base -----------------------------------------------------------------------


def base_tensor(base: FolderInspection, name: str) -> TensorInfo | None:
    """The base tensor of that name; a tied lm_head resolves to the input embedding."""
    if name in base.tensors:
        return base.tensors[name]
    tied = (base.config or {}).get("tie_word_embeddings", True)
    if name == "lm_head.weight" and tied is not False:
        for candidate, info in sorted(base.tensors.items()):
            if candidate.endswith(_TIED_EMBEDDING_SUFFIXES):
                return info
    return None


def _require_model_base(base: FolderInspection, base_slug: str) -> None:
    if base.kind != "model":
        raise ValidationFailed(f"base {base_slug} is an adapter, not a model", param="base")


def check_adapter_fits_base(adapter: FolderInspection, base: FolderInspection, *, base_slug: str) -> None:
    """Every LoRA-adapted module and every saved full tensor must exist in the base with a matching shape."""
    _require_model_base(base, base_slug)
    modules, others = split_adapter_keys(adapter.tensors)
    fan_in_fan_out = bool((adapter.adapter_config or {}).get("fan_in_fan_out", False))
    for module, mod in sorted(modules.items()):
        if mod.a is None or mod.b is None:
            continue
        out_f, in_f, _ = _lora_out_in(mod)
        # Embedding weights are [num_embeddings, dim] and Conv1D (fan_in_fan_out) weights are [in, out].
        expected = (in_f, out_f) if mod.embedding or fan_in_fan_out else (out_f, in_f)
        found = base_tensor(base, f"{module}.weight")
        if found is None:
            raise ValidationFailed(f"module {module} not found in base {base_slug}", param="target_modules")
        if found.shape != expected:
            raise ValidationFailed(
                f"shape of {module}: adapter implies {_fmt_shape(expected)}, base has {_fmt_shape(found.shape)}",
                param=f"files[{adapter.tensor_files[mod.keys[0]]}]",
            )
    for key, base_name in sorted(others.items()):
        info = adapter.tensors[key]
        found = base_tensor(base, base_name)
        if found is None:
            raise ValidationFailed(f"tensor {base_name} not found in base {base_slug}", param="modules_to_save")
        if found.shape != info.shape:
            raise ValidationFailed(
                f"shape of {base_name}: adapter has {_fmt_shape(info.shape)}, base has {_fmt_shape(found.shape)}",
                param=f"files[{adapter.tensor_files[key]}]",
            )


def _is_lm_head(name: str) -> bool:
    return name.split(".", 1)[0] == "lm_head"


def check_finetune_fits_base(ft: FolderInspection, base: FolderInspection, *, base_slug: str) -> None:
    """A finetune is usable as a task vector only if it has the base's architecture and tensor shapes."""
    _require_model_base(base, base_slug)
    if ft.kind != "model":
        raise ValidationFailed("a finetune must be a full model folder, not an adapter", param="kind")
    if ft.architecture != base.architecture:
        raise ValidationFailed(
            f"architecture {ft.architecture} differs from base {base_slug} ({base.architecture})",
            param="base",
        )
    for name, info in sorted(ft.tensors.items()):
        found = base.tensors.get(name)
        if found is None:
            if _is_lm_head(name):
                continue  # tied embeddings: the base keeps no separate lm_head
            raise ValidationFailed(
                f"tensor {name} not found in base {base_slug}",
                param=f"files[{ft.tensor_files.get(name, name)}]",
            )
        if found.shape != info.shape:
            raise ValidationFailed(
                f"shape of {name}: finetune has {_fmt_shape(info.shape)}, base {base_slug} has "
                f"{_fmt_shape(found.shape)}",
                param=f"files[{ft.tensor_files.get(name, name)}]",
            )
    for name in sorted(base.tensors.keys() - ft.tensors.keys()):
        if not _is_lm_head(name):
            raise ValidationFailed(f"tensor {name} of base {base_slug} is missing from the finetune", param="files")
