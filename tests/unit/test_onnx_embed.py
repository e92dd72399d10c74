"""The routers' embeddings: onnxruntime and the direct torch path give sentence-transformers' own numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routers.query.embedder import SentenceEmbedder, default_embedding_model
from routers.query.onnx_embed import exportable, model_key

TEXTS = ["Convert 3 km to metres.", "What is the sentiment of this review? Loved it.", "Sort 5, 2, 9."]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_backends_match_sentence_transformers(backend: str, tmp_path: Path) -> None:
    embedder = SentenceEmbedder(default_embedding_model(), backend=backend, cache_root=tmp_path)
    assert embedder.backend == backend  # no silent fall back to torch
    if backend == "onnx":
        assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1  # exported once, cached
        assert not list((tmp_path / "onnx").glob("*.tmp"))
    want = embedder._model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    singles = np.stack([embedder.encode([text])[0] for text in TEXTS])  # one new query at a time
    np.testing.assert_allclose(singles, want, atol=2e-5)
    fresh = [f"{t} (again)" for t in TEXTS]
    batch = embedder.encode(fresh)  # several new texts at once (fitting)
    np.testing.assert_allclose(
        batch, embedder._model.encode(fresh, normalize_embeddings=True, convert_to_numpy=True), atol=2e-5
    )
    assert batch.dtype == np.float32 and np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, embedder.dim)


def test_a_second_embedder_reuses_the_export(tmp_path: Path) -> None:
    SentenceEmbedder(default_embedding_model(), cache_root=tmp_path)
    [exported] = (tmp_path / "onnx").glob("*.onnx")
    stamp = exported.stat().st_mtime_ns
    assert SentenceEmbedder(default_embedding_model(), cache_root=tmp_path).backend == "onnx"
    assert exported.stat().st_mtime_ns == stamp


def test_other_pipelines_stay_on_torch(tmp_path: Path) -> None:
    class Transformer: ...

    class Pooling:
        pooling_mode = "cls"

    assert "cls" in (exportable([Transformer(), Pooling()]) or "")
    assert "pipeline" in (exportable([Transformer()]) or "")
    Pooling.pooling_mode = "mean"
    assert exportable([Transformer(), Pooling()]) is None
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = model_key(str(folder))
    (folder / "config.json").write_text('{"changed": 1}')
    assert model_key(str(folder)) != before  # a changed model gets a new export
