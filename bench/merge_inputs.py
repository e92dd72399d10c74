"""Inputs for the merge benchmark: synthetic "finetunes" of a base model folder and mergekit configs.

No hub is reachable here, so the models to merge are made from the base by adding seeded Gaussian noise
to every floating-point tensor. Each finetune's delta on a tensor is

    delta_i = scale * ref(W) * (sqrt(shared) * z_shared + sqrt(1 - shared) * z_i)

with ``ref(W)`` the tensor's standard deviation, ``z_shared`` one standard normal draw common to all
finetunes of the tensor and ``z_i`` one per finetune. Any two finetunes' deltas then correlate with
coefficient ``shared`` and disagree in sign on ``arccos(shared) / pi`` of the elements (1/3 at the
default 0.5), so TIES' sign election and magnitude trimming both have work to do. Draws depend only on
(seed, tensor name, finetune index), so a folder is reproducible on its own, whatever ``n`` is.

Each finetune is a full Hugging Face folder (config.json, generation_config.json, tokenizer files, weights
in the base's dtype and shard layout), written tensor by tensor straight into the safetensors format so
memory stays at about one tensor whatever the model size, and cached: a folder whose marker file matches
the parameters (and the base's weight files) is reused as it is.

    from bench.merge_inputs import make_finetunes, mergekit_config
    from registry.convert import cached_smollm2

    base = cached_smollm2()
    models = make_finetunes(base, Path("/tmp/merge-bench"), n=3)
    config = mergekit_config("ties", base, models, {"weight": 1.0, "density": 0.2, "normalize": True})
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

MARKER = ".moerge-finetune.json"
FORMAT_VERSION = 1
DEFAULT_SCALE = 1e-2
DEFAULT_SEED = 1234
DEFAULT_SHARED = 0.5

# Weight files are rewritten; README.md describes the base (not these); dotfiles are other tools' markers.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SKIP_NAMES = {"README.md"}

# safetensors dtype codes for the torch dtypes a checkpoint may hold.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _ST_DTYPES[torch.float8_e4m3fn] = "F8_E4M3"
    _ST_DTYPES[torch.float8_e5m2] = "F8_E5M2"


def make_finetunes(
    base_dir: Path,
    out_root: Path,
    n: int = 3,
    scale: float = DEFAULT_SCALE,
    seed: int = DEFAULT_SEED,
    shared: float = DEFAULT_SHARED,
) -> list[Path]:
    """Build (or reuse) ``n`` perturbed copies of the model folder ``base_dir`` under ``out_root``.

    Returns the folders ``out_root/<base name>-ft<i>`` for i in 0..n-1. ``scale`` is the noise standard
    deviation relative to each tensor's own; ``shared`` (in [0, 1]) the fraction of the noise variance
    common to all finetunes. Non-floating tensors are copied unchanged. Finetunes already present with a
    matching marker are not rebuilt; the missing ones are written in one pass over the base.
    """
    base_dir = Path(base_dir).resolve()
    out_root = Path(out_root)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= shared <= 1.0:
        raise ValueError(f"shared must be in [0, 1], got {shared}")
    if scale < 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite non-negative number, got {scale}")
    shards = _weight_files(base_dir)

    folders = [out_root / f"{base_dir.name}-ft{i}" for i in range(n)]
    wanted = {i: _marker_payload(base_dir, shards, i, scale, seed, shared) for i in range(n)}
    todo = [i for i in range(n) if _read_marker(folders[i]) != wanted[i]]
    if not todo:
        return folders

    out_root.mkdir(parents=True, exist_ok=True)
    staging = {i: out_root / f".{folders[i].name}.partial" for i in todo}
    for i in todo:
        shutil.rmtree(staging[i], ignore_errors=True)
        staging[i].mkdir(parents=True)
        _copy_side_files(base_dir, staging[i])

    for shard in shards:
        _perturb_shard(shard, {i: staging[i] / shard.name for i in todo}, scale, seed, shared)

    for i in todo:
        (staging[i] / MARKER).write_text(json.dumps(wanted[i], indent=2, sort_keys=True) + "\n")
        if folders[i].exists():
            shutil.rmtree(folders[i])
        os.replace(staging[i], folders[i])
    return folders


def perturbation(
    tensor: torch.Tensor, name: str, index: int, scale: float, seed: int, shared: float = DEFAULT_SHARED
) -> torch.Tensor:
    """The float32 delta that finetune ``index`` adds to the base tensor ``name`` (see the module doc)."""
    if scale == 0 or tensor.numel() == 0:
        return torch.zeros(tensor.shape, dtype=torch.float32)
    ref = _reference_scale(tensor)
    # At most two tensor-sized float32 buffers alive at once.
    out = _normal(tensor.shape, _seed_for(seed, name, -1)).mul_(math.sqrt(shared))
    if shared < 1:
        out.add_(_normal(tensor.shape, _seed_for(seed, name, index)), alpha=math.sqrt(1.0 - shared))
    return out.mul_(scale * ref)


def mergekit_config(
    method: str,
    base: Path | str | None,
    models: Sequence[Path | str],
    params: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
    out_dtype: str | None = None,
) -> dict[str, Any]:
    """A mergekit ``mergekit-yaml`` configuration (as a dict, ready for yaml.safe_dump) merging ``models``.

    ``params`` mixes per-model parameters (``weight``, ``density``, ``gamma``, ``epsilon``: a scalar for
    all models or a sequence with one value per model) and global ones (``normalize``, ``lambda``,
    ``rescale``, ``int8_mask``, ``t``), placed where mergekit reads them: ``models[i].parameters`` and
    the top-level ``parameters``. ``dtype`` is mergekit's compute dtype (every input tensor is cast to it
    on load); ``out_dtype``, when given, the dtype written. ``base`` becomes ``base_model`` (mergekit adds
    it to the inputs itself; it must not be listed in ``models``). Example, TIES::

        mergekit_config("ties", base, models, {"weight": 1.0, "density": 0.2, "normalize": True, "lambda": 1.0})
        # {"merge_method": "ties", "base_model": "/.../base", "dtype": "float32",
        #  "models": [{"model": "/.../ft0", "parameters": {"weight": 1.0, "density": 0.2}}, ...],
        #  "parameters": {"normalize": True, "lambda": 1.0}}
    """
    params = dict(params or {})
    unknown = set(params) - set(PER_MODEL_PARAMS) - set(GLOBAL_PARAMS)
    if unknown:
        raise ValueError(
            f"unknown mergekit parameter(s) {sorted(unknown)}; per model: {sorted(PER_MODEL_PARAMS)}, "
            f"global: {sorted(GLOBAL_PARAMS)}"
        )
    if not models:
        raise ValueError("no models to merge")
    base_path = str(Path(base).resolve()) if base is not None else None
    model_paths = [str(Path(m).resolve()) for m in models]
    if base_path is not None and base_path in model_paths:
        raise ValueError("the base model must not be listed among the models (mergekit adds it itself)")

    per_model: list[dict[str, Any]] = [{} for _ in model_paths]
    for key in PER_MODEL_PARAMS:
        if key not in params:
            continue
        values = _per_model_values(key, params[key], len(model_paths))
        for entry, value in zip(per_model, values, strict=True):
            entry[key] = value

    config: dict[str, Any] = {"merge_method": method}
    if base_path is not None:
        config["base_model"] = base_path
    config["models"] = [
        {"model": path, "parameters": entry} if entry else {"model": path}
        for path, entry in zip(model_paths, per_model, strict=True)
    ]
    shared_params = {key: _plain(params[key]) for key in GLOBAL_PARAMS if key in params}
    if shared_params:
        config["parameters"] = shared_params
    config["dtype"] = dtype
    if out_dtype is not None:
        config["out_dtype"] = out_dtype
    return config


PER_MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")
GLOBAL_PARAMS = ("normalize", "lambda", "rescale", "int8_mask", "t")


# --- helpers ---


def _weight_files(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [base_dir / name for name in names]
    else:
        shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {base_dir}")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"weight file(s) listed but missing in {base_dir}: {[s.name for s in missing]}")
    return shards


def _marker_payload(
    base_dir: Path, shards: Iterable[Path], index: int, scale: float, seed: int, shared: float
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "base": str(base_dir),
        "base_weights": {s.name: [s.stat().st_size, s.stat().st_mtime_ns] for s in shards},
        "index": index,
        "scale": scale,
        "seed": seed,
        "shared": shared,
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _copy_side_files(base_dir: Path, out: Path) -> None:
    """Copy config, generation config, tokenizer and index files: everything but weights, card and dotfiles."""
    for path in sorted(base_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in _SKIP_NAMES:
            continue
        if path.name.endswith(_SKIP_SUFFIXES):
            continue
        shutil.copy2(path, out / path.name)


def _perturb_shard(src: Path, outs: Mapping[int, Path], scale: float, seed: int, shared: float) -> None:
    """Write, for each finetune index in ``outs``, a perturbed copy of the safetensors file ``src``."""
    with safe_open(str(src), framework="pt") as reader:
        names = list(reader.keys())
        metadata = reader.metadata()
        header: dict[str, Any] = {}
        offset = 0
        for name in names:
            view = reader.get_slice(name)
            dtype = view.get_dtype()
            shape = list(view.get_shape())
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it

        files = {i: open(path, "wb") for i, path in outs.items()}  # noqa: SIM115 - closed in finally
        try:
            for f in files.values():
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
            for name in names:
                tensor = reader.get_tensor(name)
                for i, f in files.items():
                    if tensor.is_floating_point():
                        out = perturbation(tensor, name, i, scale, seed, shared).add_(tensor).to(tensor.dtype)
                    else:
                        out = tensor
                    if _ST_DTYPES.get(out.dtype) != header[name]["dtype"]:
                        raise RuntimeError(f"{src.name}:{name}: unexpected dtype {out.dtype}")
                    f.write(_raw_bytes(out))
                    del out
                del tensor
        finally:
            for f in files.values():
                f.close()
    for path in outs.values():
        if path.stat().st_size != 8 + len(raw) + offset:
            raise RuntimeError(f"{path}: wrote {path.stat().st_size} bytes, expected {8 + len(raw) + offset}")


def _itemsize(st_dtype: str) -> int:
    for dtype, code in _ST_DTYPES.items():
        if code == st_dtype:
            return torch.empty((), dtype=dtype).element_size()
    raise ValueError(f"unsupported safetensors dtype {st_dtype}")


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    # Little-endian machine assumed (as safetensors' own writer does on x86/arm64).
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def _reference_scale(tensor: torch.Tensor) -> float:
    """The tensor's standard deviation; its mean magnitude (or 1) for constant tensors such as fresh norms."""
    t = tensor.detach().to(torch.float32)
    if t.numel() > 1:
        std = float(t.std(correction=0))
        if std > 0 and math.isfinite(std):
            return std
    mean_abs = float(t.abs().mean()) if t.numel() else 0.0
    return mean_abs if mean_abs > 0 and math.isfinite(mean_abs) else 1.0


def _seed_for(seed: int, name: str, index: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + (index + 1) * 104_729) % (2**63 - 1)


def _normal(shape: torch.Size, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _per_model_values(key: str, value: Any, count: int) -> list[Any]:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != count:
            raise ValueError(f"{key}: {len(value)} values for {count} models")
        return [_plain(v) for v in value]
    return [_plain(value)] * count


def _plain(value: Any) -> Any:
    """YAML-safe scalars: numpy / torch numbers become Python ones."""
    if isinstance(value, bool | str) or value is None:
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, int | float):
        return value
    raise TypeError(f"unsupported mergekit parameter value {value!r}")
