"""`instruct` router (GLIDER's global router): a language model describes the query's task; the description
is matched to the experts' task descriptions.

Each expert is embedded once by its task description (its description when that is empty, its slug when
both are). At route time the model ``model`` (default: the context's default model) is asked for one short
sentence describing the task the query asks for; that sentence is embedded and every expert is scored by
cosine similarity. The best k at or above ``threshold`` answer, weighted by a softmax of their scores with
``temperature``; when none reaches it the composition's fallback answers. The generated description is
returned in ``decision.extra["task_description"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ValidationFailed
from routers.query.base import (
    ROUTERS,
    Candidate,
    GlobalRouter,
    RouteDecision,
    RouterConfig,
    require,
    top_k_decision,
)

PROMPT = (
    "In one short sentence, describe the task this query asks for. Do not answer the query; "
    "only say what kind of task it is.\n\nQuery: {query}"
)


class InstructConfig(RouterConfig, frozen=True):
    """Parameters of ``instruct``.

    model: slug of the model that writes the task description (None: the context's default model).
    max_new_tokens: length limit of the generated description (1..256).
    threshold: the lowest cosine similarity an expert may be chosen with (-1..1).
    temperature: softmax temperature of the chosen experts' weights (> 0, at most 10).
    max_query_chars: the query is cut to this many characters in the prompt (>= 16).
    """

    model: str | None = None
    max_new_tokens: int = 32
    threshold: float = 0.2
    temperature: float = 0.05
    max_query_chars: int = 2000

    def check(self) -> None:
        require(self.model is None or bool(self.model.strip()), "model", "must be a slug or null")
        require(1 <= self.max_new_tokens <= 256, "max_new_tokens", "must lie between 1 and 256")
        require(math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0, "threshold", "must lie in [-1, 1]")
        require(0.0 < self.temperature <= 10.0, "temperature", "must be positive (at most 10)")
        require(self.max_query_chars >= 16, "max_query_chars", "must be at least 16")


def expert_text(candidate: Candidate) -> str:
    for text in (candidate.task_description, candidate.description):
        if text.strip():
            return text.strip()
    return " ".join(candidate.slug.replace("_", " ").replace("-", " ").split())


def first_sentence_line(text: str) -> str:
    """The first non-empty line of a completion, stripped of quotes and a leading label."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            lowered = line.lower()
            for label in ("task:", "task description:", "description:"):
                if lowered.startswith(label):
                    line = line[len(label) :].strip()
                    break
            return line
    return ""


@dataclass
class InstructIndex:
    slugs: list[str]
    matrix: np.ndarray  # (experts, dim), L2-normalized rows


@ROUTERS.register
class InstructRouter(GlobalRouter):
    name = "instruct"
    config_cls = InstructConfig
    help = "GLIDER's global router: an LLM describes the query's task; the description is matched to experts"

    config: InstructConfig

    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        text = expert_text(candidate)
        return {"text": text, "embedding": (await self.context.embed([text]))[0]}

    def prepare(self, candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> InstructIndex:
        dim = self.context.embedder.dim
        rows = [np.asarray(s["embedding"], dtype=np.float32) for s in states]
        matrix = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
        return InstructIndex([c.slug for c in candidates], matrix)

    async def describe(self, query: str) -> str:
        """The model's one-sentence description of the query's task ('' when it wrote nothing)."""
        model = self.config.model or self.context.default_model
        if not model:
            raise ValidationFailed(
                "router 'instruct' needs a model to describe the task: set router_params.model",
                param="router_params.model",
            )
        generate = self.context.need_generate(self.name)
        prompt = PROMPT.format(query=query[: self.config.max_query_chars])
        return first_sentence_line(
            await generate(model, [{"role": "user", "content": prompt}], self.config.max_new_tokens)
        )

    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        index: InstructIndex = prepared
        description = await self.describe(query)
        text = description or query  # an empty description: match the query itself
        vector = (await self.context.embed([text]))[0]
        row_of = {slug: i for i, slug in enumerate(index.slugs)}
        cosines = index.matrix @ vector if len(index.slugs) else np.zeros(0)
        scores = {c.slug: float(cosines[row_of[c.slug]]) if c.slug in row_of else 0.0 for c in candidates}
        best = max(scores, key=lambda s: scores[s]) if scores else None
        said = f"task described as {description!r}" if description else "the model gave no description (query used)"
        reason = f"{said}; best match {best} at {scores[best]:.2f}" if best else said
        decision = top_k_decision(
            self.name, scores, k, threshold=self.config.threshold, temperature=self.config.temperature, reason=reason
        )
        if decision.fallback:
            decision.reason = f"{said}; {decision.reason}"
        decision.extra["task_description"] = description
        return decision
