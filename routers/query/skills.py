"""`skills` router (Symbolic-MoE): recruit experts by the skills a query needs and their measured strengths.

Skill profile of an expert e, from its evaluation results ``(task, metric, value)`` with ``value`` an
accuracy in [0, 1]. On n graded items an accuracy v is (right − wrong) / n = 2v − 1, i.e. +1 per right and
−1 per wrong item, normalized by the item count. Every evaluation credits the task itself and every skill
the expert lists:

    profile_e[key] = mean of (2·v − 1) over the evaluations of e that credit ``key``     (in [−1, 1])

A skill nobody evaluated has profile 0.

The query's skills. Every known skill s (listed by an expert or named by an evaluation task) is described by
texts: its name and the example prompts of the experts that list it. With q the query's embedding and
cos the cosine similarity, c(s) = max over descriptor texts t of s of cos(q, t) and sim(s) = max(0, c(s)).
The (at most) ``query_skills`` skills with the largest c(s), among those with c(s) >= ``min_similarity``,
are the query's inferred skills S. No skill inferred: the fallback answers.

Recruiting. prior_e(s) = 1 when e lists s (a declared skill counts as one right answer), else 0;

    score(e) = Σ over s in S of  sim(s) · (profile_e[s] + prior_e(s))

The best k experts with score > ``min_score`` answer, weighted in proportion to their scores.

``group_by_expert`` turns per-query assignments into per-expert batches, so a batch of queries runs each
expert's model once (Symbolic-MoE's batched inference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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
)


class SkillsConfig(RouterConfig, frozen=True):
    """Parameters of ``skills``.

    query_skills: how many inferred skills of the query count (the most similar ones; 1..32).
    min_similarity: a skill less similar than this (cosine) to the query is not inferred (-1..1).
    min_score: an expert is recruited only with a score above this (>= 0; 0 = any positive score).
    """

    query_skills: int = 2
    min_similarity: float = 0.2
    min_score: float = 0.0

    def check(self) -> None:
        require(1 <= self.query_skills <= 32, "query_skills", "must lie between 1 and 32")
        require(
            math.isfinite(self.min_similarity) and -1.0 <= self.min_similarity <= 1.0,
            "min_similarity",
            "must lie between -1 and 1",
        )
        require(math.isfinite(self.min_score) and self.min_score >= 0.0, "min_score", "must be a number >= 0")


def skill_text(skill: str) -> str:
    """A skill name as a phrase to embed ("date_normalization" -> "date normalization")."""
    return " ".join(skill.replace("_", " ").replace("-", " ").split())


def skill_profile(candidate: Candidate) -> dict[str, float]:
    """Mean of (2·accuracy − 1) per skill or evaluation task (see the module docstring)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for task, _metric, value in candidate.evals:
        if not math.isfinite(value):
            continue
        signed = 2.0 * min(max(float(value), 0.0), 1.0) - 1.0
        for key in dict.fromkeys((*candidate.skills, task)):
            sums[key] = sums.get(key, 0.0) + signed
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def group_by_expert(assignments: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    """(query index, expert slug) pairs -> expert slug -> query indices, so each expert runs one batch.

    Experts keep the order of their first assignment, indices their order of appearance; a repeated pair
    is kept once.
    """
    groups: dict[str, list[int]] = {}
    seen: set[tuple[int, str]] = set()
    for index, slug in assignments:
        if (index, slug) in seen:
            continue
        seen.add((index, slug))
        groups.setdefault(slug, []).append(index)
    return groups


def assignments_of(decisions: Sequence[RouteDecision]) -> list[tuple[int, str]]:
    """The (query index, expert slug) pairs of a batch of decisions, for ``group_by_expert``."""
    return [(i, slug) for i, decision in enumerate(decisions) for slug in decision.slugs]


@dataclass
class SkillTable:
    """What ``route`` reads: every known skill's descriptor embeddings and each expert's profile."""

    skills: list[str]
    descriptors: np.ndarray  # (rows, dim): skill names and example prompts
    owner: np.ndarray  # (rows,) index into ``skills`` of each descriptor row
    profiles: dict[str, dict[str, float]]  # expert slug -> skill -> profile value
    listed: dict[str, set[str]]  # expert slug -> the skills it declares


@ROUTERS.register
class SkillsRouter(GlobalRouter):
    name = "skills"
    config_cls = SkillsConfig
    help = "Symbolic-MoE: infer the query's skills and recruit the experts with the best skill profiles"

    config: SkillsConfig

    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        skills = list(dict.fromkeys(s for s in candidate.skills if s.strip()))
        tasks = list(dict.fromkeys(task for task, _, _ in candidate.evals if task.strip()))
        keys = list(dict.fromkeys(skills + tasks))
        prompts = [p for p in candidate.example_prompts if p.strip()]
        return {
            "skills": skills,
            "keys": keys,  # listed skills and evaluated tasks: the skills this expert has a profile entry for
            "profile": skill_profile(candidate),
            "key_embeddings": await self.context.embed([skill_text(k) for k in keys]),
            "example_embeddings": await self.context.embed(prompts),
        }

    def prepare(self, candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> SkillTable:
        skills: list[str] = []
        index: dict[str, int] = {}
        rows: list[np.ndarray] = []
        owner: list[int] = []
        profiles: dict[str, dict[str, float]] = {}
        listed: dict[str, set[str]] = {}
        name_done: set[str] = set()
        for candidate, state in zip(candidates, states, strict=True):
            profiles[candidate.slug] = {str(k): float(v) for k, v in state["profile"].items()}
            listed[candidate.slug] = set(state["skills"])
            examples = np.asarray(state["example_embeddings"], dtype=np.float32)
            key_vectors = np.asarray(state["key_embeddings"], dtype=np.float32)
            for key, vector in zip(state["keys"], key_vectors, strict=True):
                if key not in index:
                    index[key] = len(skills)
                    skills.append(key)
                if key not in name_done:  # the name once, however many experts share the skill
                    name_done.add(key)
                    rows.append(vector)
                    owner.append(index[key])
                if key in listed[candidate.slug]:  # an expert's examples describe the skills it declares
                    rows.extend(examples)
                    owner.extend([index[key]] * len(examples))
        dim = self.context.embedder.dim
        descriptors = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
        return SkillTable(skills, descriptors, np.asarray(owner, dtype=np.int64), profiles, listed)

    async def infer_skills(self, query: str, table: SkillTable) -> list[tuple[str, float]]:
        """The query's ``query_skills`` most similar skills with their similarity (best first)."""
        if not table.skills:
            return []
        q = (await self.context.embed([query]))[0]
        cosines = table.descriptors @ q
        best = np.full(len(table.skills), -np.inf, dtype=np.float64)
        np.maximum.at(best, table.owner, cosines.astype(np.float64))
        order = sorted(range(len(table.skills)), key=lambda i: (-best[i], table.skills[i]))
        kept = [i for i in order if best[i] >= self.config.min_similarity][: self.config.query_skills]
        return [(table.skills[i], max(0.0, float(best[i]))) for i in kept]

    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        table: SkillTable = prepared
        inferred = await self.infer_skills(query, table)
        scores: dict[str, float] = {}
        for candidate in candidates:
            profile = table.profiles.get(candidate.slug, {})
            declared = table.listed.get(candidate.slug, set())
            total = sum(sim * (profile.get(s, 0.0) + (1.0 if s in declared else 0.0)) for s, sim in inferred)
            scores[candidate.slug] = round(total, 6)
        skills_text = ", ".join(f"{s} ({sim:.2f})" for s, sim in inferred) or "none"
        extra: dict[str, Any] = {"query_skills": {s: round(sim, 6) for s, sim in inferred}}
        order = {c.slug: i for i, c in enumerate(candidates)}
        recruited = sorted(
            (s for s, v in scores.items() if v > self.config.min_score), key=lambda s: (-scores[s], order[s])
        )[: max(k, 0)]
        if not inferred:
            reason = f"the query resembles no known skill (min_similarity {self.config.min_similarity})"
            return RouteDecision(self.name, [], scores, reason, True, extra)
        if not recruited:
            reason = f"no expert has a score above {self.config.min_score} for the query's skills: {skills_text}"
            return RouteDecision(self.name, [], scores, reason, True, extra)
        total = sum(scores[s] for s in recruited)
        experts = [(s, round(scores[s] / total, 6)) for s in recruited]
        reason = f"query skills {skills_text}; recruited {', '.join(recruited)}"
        return RouteDecision(self.name, experts, scores, reason, False, extra)
