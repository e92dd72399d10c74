"""The routers' sentence embeddings through onnxruntime: the same numbers as sentence-transformers, faster.

A router embeds each query, and on this CPU that was most of a routing decision: all-MiniLM-L6-v2 took
12-14 ms per short query in torch and 4.9 ms in onnxruntime (max difference 1e-7). The model's encoder,
mean pooling and L2 normalization are exported once to ONNX (about 1.5 s) and cached under
``$MOERGE_CACHE/onnx`` by the model's files; tokenization stays sentence-transformers' own. Only the
usual pipeline (Transformer, mean Pooling, optional Normalize) is exported; any other keeps torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.progress import ticking

logger = logging.getLogger(__name__)

BATCH = 32  # texts per onnxruntime call when fitting (sorted by length, so little padding)
EXPORT_VERSION = 2  # part of the cache key: bump when the exported graph changes


def exportable(st_model: Any) -> str | None:
    """None when the pipeline is Transformer -> mean Pooling [-> Normalize]; else why it is not."""
    names = [type(module).__name__ for module in st_model]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"pipeline {names} is not Transformer -> Pooling [-> Normalize]"
    if getattr(st_model[1], "pooling_mode", None) != "mean":
        return f"pooling {getattr(st_model[1], 'pooling_mode', '?')!r} is not mean"
    return None


def model_key(name: str) -> str:
    """Names the export: a local folder by its files (name, size, mtime); a hub id by itself."""
    digest = hashlib.sha256(f"{EXPORT_VERSION}\0{name}".encode())
    folder = Path(name)
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _preprocess(st_model: Any, texts: Sequence[str]) -> dict[str, Any]:
    prepare = getattr(st_model, "preprocess", None) or st_model.tokenize
    return {k: v for k, v in prepare(list(texts)).items() if hasattr(v, "shape")}


def _input_names(st_model: Any) -> list[str]:
    sample = _preprocess(st_model, ["x"])
    return [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]


def export(st_model: Any, path: Path) -> None:
    """Write the encoder + mean pooling + normalization as ONNX to ``path`` (atomically)."""
    import torch

    encoder = st_model[0].auto_model.eval()
    # Two lengths, so the traced graph is the one that applies a padding mask (the tracer fixes branches
    # taken on the sample, and a sample without padding could take the "no mask needed" one).
    sample = _preprocess(st_model, ["an example sentence for the export, with padding after the short one", "short"])
    inputs = _input_names(st_model)

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            named = dict(zip(inputs, tensors, strict=True))
            hidden = self.encoder(**named).last_hidden_state
            mask = named["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        axes = {n: {0: "batch", 1: "tokens"} for n in inputs} | {"embedding": {0: "batch"}}
        torch.onnx.export(
            MeanPooled().eval(),
            tuple(sample[n] for n in inputs),
            tmp,
            input_names=inputs,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
        os.replace(tmp, path)  # a concurrent exporter's file is as good as ours
    finally:
        Path(tmp).unlink(missing_ok=True)


class OnnxSentenceModel:
    """Embeds with an exported model: sentence-transformers' tokenization, onnxruntime's forward."""

    def __init__(self, st_model: Any, path: Path, inputs: list[str], dim: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = min(4, os.cpu_count() or 1)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._st = st_model
        self._inputs = inputs
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            features = _preprocess(self._st, [texts[i] for i in chunk])
            feed = {n: features[n].numpy().astype(np.int64) for n in self._inputs}
            out[chunk] = self._session.run(None, feed)[0]
        return out


def onnx_model(st_model: Any, name: str, dim: int, cache_root: Path) -> OnnxSentenceModel | None:
    """The exported model (exported now if not cached), or None, with the reason logged, when this model
    cannot be exported or onnxruntime is missing."""
    reason = exportable(st_model)
    if reason is not None:
        logger.info("embedding model %s stays on torch: %s", name, reason)
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning("onnxruntime is not installed: the routers embed with torch (slower)")
        return None
    path = cache_root / "onnx" / f"{model_key(name)}.onnx"
    if not path.exists():
        try:
            with ticking(logger, f"exporting the embedding model {name} to ONNX (once per machine)"):
                export(st_model, path)
        except Exception as exc:  # an exporter gap for some architecture: torch still works
            logger.warning("exporting %s to ONNX failed (%s): the routers embed with torch", name, exc)
            return None
    return OnnxSentenceModel(st_model, path, _input_names(st_model), dim)
