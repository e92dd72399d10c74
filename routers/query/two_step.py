"""`two_step` router (Composition of Experts): a classifier names the query's category, a table names its experts.

Each expert has one category (its slug, or the first of its skills or domains) and training texts (its
example prompts plus its task description). ``prepare`` fits a logistic-regression classifier from the
embeddings of all candidates' training texts to their categories; the category -> experts table is read
off the same states. At route time the classifier's probability of a category is the score of every expert
in that category, the best experts are chosen, and when the top probability is below ``min_confidence`` the
decision falls back to the composition's generalist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from routers.query.base import (
    ROUTERS,
    Candidate,
    GlobalRouter,
    RouteDecision,
    RouterConfig,
    require,
)


class TwoStepConfig(RouterConfig, frozen=True):
    """Parameters of ``two_step``.

    category_field: which routing field names an expert's category: "slug" (one category per expert),
        "skills" or "domains" (the first entry; experts without one use their slug).
    min_confidence: the classifier's top category probability below which the decision falls back (0..1).
    regularization: inverse regularization strength C of the logistic regression (> 0; larger = sharper
        probabilities). On unit-length MiniLM embeddings scikit-learn's C=1 gave ~0.6 for clearly in-category
        queries (3 categories), C=20 about 0.93, while an off-topic query stayed below 0.5 either way.
    """

    category_field: Literal["skills", "domains", "slug"] = "slug"
    min_confidence: float = 0.5
    regularization: float = 20.0

    def check(self) -> None:
        require(0.0 <= self.min_confidence <= 1.0, "min_confidence", "must lie between 0 and 1")
        require(0.0 < self.regularization <= 1e6, "regularization", "must be positive (at most 1e6)")


@dataclass
class TwoStepModel:
    """What ``route`` reads: the fitted classifier (None with fewer than two categories) and the table."""

    categories: list[str]  # the classifier's classes, in its column order
    category_of: dict[str, str]  # expert slug -> category
    classifier: Any = None
    members: dict[str, list[str]] = field(default_factory=dict)  # category -> expert slugs, candidate order


def expert_category(candidate: Candidate, category_field: str) -> str:
    if category_field == "skills" and candidate.skills:
        return candidate.skills[0]
    if category_field == "domains" and candidate.domains:
        return candidate.domains[0]
    return candidate.slug


def training_texts(candidate: Candidate) -> list[str]:
    """Example prompts and task description; the description only when both are missing."""
    texts = [t for t in candidate.example_prompts if t.strip()]
    if candidate.task_description.strip():
        texts.append(candidate.task_description)
    if not texts and candidate.description.strip():
        texts.append(candidate.description)
    return texts


@ROUTERS.register
class TwoStepRouter(GlobalRouter):
    name = "two_step"
    config_cls = TwoStepConfig
    help = "Composition of Experts: a classifier maps the query to a category, a table maps categories to experts"

    config: TwoStepConfig

    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        texts = training_texts(candidate)
        return {
            "category": expert_category(candidate, self.config.category_field),
            "embeddings": await self.context.embed(texts),
        }

    def prepare(self, candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> TwoStepModel:
        from sklearn.linear_model import LogisticRegression

        category_of: dict[str, str] = {}
        members: dict[str, list[str]] = {}
        rows: list[np.ndarray] = []
        labels: list[str] = []
        for candidate, state in zip(candidates, states, strict=True):
            category = str(state["category"])
            category_of[candidate.slug] = category
            members.setdefault(category, []).append(candidate.slug)
            embeddings = np.asarray(state["embeddings"], dtype=np.float32)
            rows.extend(embeddings)
            labels.extend([category] * len(embeddings))
        categories = sorted(set(labels))  # a category with no training text cannot be predicted
        if len(categories) < 2:
            return TwoStepModel(categories, category_of, None, members)
        classifier = LogisticRegression(C=self.config.regularization, max_iter=2000, random_state=0)
        classifier.fit(np.stack(rows), np.asarray(labels))
        return TwoStepModel([str(c) for c in classifier.classes_], category_of, classifier, members)

    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        model: TwoStepModel = prepared
        if not model.categories:
            scores = {c.slug: 0.0 for c in candidates}
            return RouteDecision(self.name, [], scores, "no expert has example prompts to train the classifier", True)
        if model.classifier is None:
            probabilities = {model.categories[0]: 1.0}  # one category: nothing to classify
        else:
            vector = await self.context.embed([query])
            row = model.classifier.predict_proba(vector)[0]
            probabilities = {c: float(p) for c, p in zip(model.categories, row, strict=True)}
        scores = {c.slug: round(probabilities.get(model.category_of.get(c.slug, ""), 0.0), 6) for c in candidates}
        top_category = max(model.categories, key=lambda c: probabilities.get(c, 0.0))  # ties: the first
        confidence = probabilities[top_category]
        extra = {"category": top_category, "confidence": round(confidence, 6)}
        if confidence < self.config.min_confidence:
            reason = (
                f"classifier confidence {confidence:.2f} for category {top_category!r} is below "
                f"min_confidence {self.config.min_confidence}"
            )
            return RouteDecision(self.name, [], scores, reason, True, extra)
        order = {c.slug: i for i, c in enumerate(candidates)}
        ranked = sorted((s for s in scores if scores[s] > 0.0), key=lambda s: (-scores[s], order[s]))[: max(k, 0)]
        if not ranked:
            reason = f"category {top_category!r} has no expert among the candidates"
            return RouteDecision(self.name, [], scores, reason, True, extra)
        total = sum(scores[s] for s in ranked)
        experts = [(s, round(scores[s] / total, 6)) for s in ranked]
        names = ", ".join(ranked)
        reason = f"classifier put the query in category {top_category!r} with confidence {confidence:.2f}: {names}"
        return RouteDecision(self.name, experts, scores, reason, False, extra)
