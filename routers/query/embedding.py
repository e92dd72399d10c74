"""`embedding` (RouterRetriever, semantic-router): route a query to the experts whose examples it resembles.

Each expert is fitted once: its example prompts and its description are embedded (one row each). A query
is embedded and compared with every row of every candidate by cosine similarity; an expert's score is the
mean of its ``top_examples`` best rows (1 = nearest neighbour). The best k at or above ``threshold`` answer,
weighted by a softmax with ``temperature``; when none reaches the threshold, the composition's fallback does.
All candidates' rows are stacked once per candidate set (``prepare``), so a decision is one matrix-vector
product plus the query's embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from routers.query.base import (
    ROUTERS,
    Candidate,
    GlobalRouter,
    RouteDecision,
    RouterConfig,
    require,
    top_k_of_array,
)


class EmbeddingConfig(RouterConfig, frozen=True):
    """Parameters of ``embedding``.

    threshold: least score (cosine similarity, -1..1) an expert needs; below it for all, the fallback answers.
    temperature: softmax temperature over the chosen experts' scores, which gives their weights (> 0).
    top_examples: an expert's score is the mean of its this-many most similar example rows (1..64).
    use_description: embed the expert's description and task description as rows too, beside its examples.
    """

    threshold: float = 0.3
    temperature: float = 0.05
    top_examples: int = 3
    use_description: bool = True

    def check(self) -> None:
        require(-1.0 <= self.threshold <= 1.0, "threshold", "must be a cosine similarity in [-1, 1]")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(1 <= self.top_examples <= 64, "top_examples", "must be in [1, 64]")


def expert_texts(candidate: Candidate, use_description: bool) -> list[str]:
    texts = [p for p in candidate.example_prompts if p.strip()]
    if use_description:
        texts += [t for t in (candidate.task_description, candidate.description) if t.strip()]
    return texts or [candidate.slug]


@dataclass
class StackedExamples:
    """Every candidate's rows in one padded matrix: expert i owns rows [i*width, (i+1)*width)."""

    matrix: np.ndarray  # (experts * width, dim), L2-normalized rows; padding rows are zero
    valid: np.ndarray  # (experts, width) bool: False marks padding
    slugs: list[str]


def stack_examples(candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> StackedExamples:
    mats = [np.asarray(s["embeddings"], dtype=np.float32) for s in states]
    width = max((len(m) for m in mats), default=1)
    dim = mats[0].shape[1] if mats else 1
    matrix = np.zeros((len(mats), width, dim), dtype=np.float32)
    valid = np.zeros((len(mats), width), dtype=bool)
    for i, m in enumerate(mats):
        matrix[i, : len(m)] = m
        valid[i, : len(m)] = True
    return StackedExamples(matrix.reshape(len(mats) * width, dim), valid, [c.slug for c in candidates])


def per_expert_scores(similarity: np.ndarray, valid: np.ndarray, top: int) -> np.ndarray:
    """Mean of each expert's ``top`` highest similarities (fewer if it has fewer rows)."""
    top = min(top, valid.shape[1])
    if valid.all():  # every expert has as many rows: no padding to mask (the common, large case)
        shaped = similarity.reshape(valid.shape)
        if top == 1:
            return shaped.max(axis=1).astype(np.float64)
        return (-np.partition(-shaped, top - 1, axis=1)[:, :top]).mean(axis=1, dtype=np.float64)
    sim = np.where(valid, similarity.reshape(valid.shape), -np.inf)
    if top == 1:
        return sim.max(axis=1)
    best = -np.partition(-sim, top - 1, axis=1)[:, :top]
    finite = np.isfinite(best)
    return np.where(finite, best, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)


@ROUTERS.register
class EmbeddingRouter(GlobalRouter):
    name = "embedding"
    config_cls = EmbeddingConfig
    help = "embed each expert's example prompts and description; route by cosine similarity to the query"
    config: EmbeddingConfig

    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        texts = expert_texts(candidate, self.config.use_description)
        vectors = await self.context.embed(texts)
        return {"embeddings": vectors}

    def prepare(self, candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> StackedExamples:
        return stack_examples(candidates, states)

    def decide(self, query_vector: np.ndarray, prepared: StackedExamples, k: int) -> RouteDecision:
        similarity = prepared.matrix @ query_vector
        scores = per_expert_scores(similarity, prepared.valid, self.config.top_examples)
        best = int(np.argmax(scores))
        return top_k_of_array(
            self.name,
            prepared.slugs,
            scores,
            k,
            threshold=self.config.threshold,
            temperature=self.config.temperature,
            reason=f"query is most similar to {prepared.slugs[best]}'s examples (cosine {scores[best]:.3f})",
        )

    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        vector = (await self.context.embed([query]))[0]
        return self.decide(vector, prepared, k)
