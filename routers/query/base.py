"""What every global (query-level) router shares: candidates, decisions, configs and the registry.

A router is fitted per expert: ``fit_expert`` turns one candidate into a state (embeddings, a skill
profile, k-shot results) that the router-state store keeps per (router, config hash, expert) and
refreshes only when that expert's routing fields change. ``route`` scores a query against the
candidates with their states and returns a decision naming every candidate's score and a reason.
Routers never touch the database or an engine directly: the ``RouterContext`` lends them an embedder and,
for the routers that need a language model (``instruct``, ``kshot``), a generate function.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol

import numpy as np

from core.errors import ValidationFailed
from core.strategies import Registry, StrategyClass, StrategyConfig


@dataclass(frozen=True)
class Candidate:
    """The routing facts of one registered expert, detached from the database session."""

    id: str
    slug: str
    description: str = ""
    task_description: str = ""
    skills: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    example_prompts: tuple[str, ...] = ()
    evals: tuple[tuple[str, str, float], ...] = ()  # (task, metric, value)

    @cached_property
    def fingerprint(self) -> str:
        """Changes whenever a field a router may fit on changes: a stale state is refitted."""
        payload = [
            self.slug,
            self.description,
            self.task_description,
            list(self.skills),
            list(self.domains),
            list(self.example_prompts),
            [list(e) for e in self.evals],
        ]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class RouteDecision:
    """Which experts answer (with weights summing to 1), every candidate's score, and why."""

    router: str
    experts: list[tuple[str, float]]
    scores: dict[str, float]
    reason: str
    fallback: bool = False  # no candidate qualified: the composition's fallback answers
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slugs(self) -> list[str]:
        return [slug for slug, _ in self.experts]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.experts]

    def as_dict(self) -> dict[str, Any]:
        return {
            "router": self.router,
            "experts": [{"slug": s, "weight": w} for s, w in self.experts],
            "scores": self.scores,
            "reason": self.reason,
            "fallback": self.fallback,
            **({"extra": self.extra} if self.extra else {}),
        }


class Embedder(Protocol):
    """Sentence embeddings, L2-normalized rows (so a dot product is the cosine similarity)."""

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


GenerateFn = Callable[[str, list[dict[str, str]], int], Awaitable[str]]
"""(expert slug, chat messages, max new tokens) -> greedy completion text."""


@dataclass
class RouterContext:
    embedder: Embedder
    generate: GenerateFn | None = None  # for routers that run a model; None where no engine is at hand
    default_model: str | None = None  # the slug `instruct` asks for a task description when none is set

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (rows L2-normalized; (0, dim) for none), computed off the event loop so
        that other requests keep being served meanwhile."""
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return await asyncio.to_thread(self.embedder.encode, list(texts))

    def need_generate(self, router: str) -> GenerateFn:
        if self.generate is None:
            raise ValidationFailed(f"router {router!r} needs a serving engine to run a model", param="router")
        return self.generate


class RouterConfig(StrategyConfig, frozen=True):
    """Base of every router's config. Subclasses add fields (with defaults and help) and override ``check``
    (raising ValidationFailed(param="router_params.<field>")); ``digest`` is the hash router states are
    stored under: same config, same fitted states."""


def require(condition: bool, field_name: str, reason: str) -> None:
    if not condition:
        raise ValidationFailed(f"router_params.{field_name}: {reason}", param=f"router_params.{field_name}")


class GlobalRouter(ABC):
    """One query-level routing method. Subclasses set ``name``, ``config_cls`` and ``help``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[RouterConfig]]
    help: ClassVar[str]
    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None  # the most candidates the router takes (None: any number)
    fit_uses_model: ClassVar[bool] = False  # True: fit_expert runs models (needs context.generate)

    def __init__(self, config: RouterConfig, context: RouterContext) -> None:
        self.config = config
        self.context = context

    @abstractmethod
    async def fit_expert(self, candidate: Candidate) -> dict[str, Any]:
        """This expert's state (JSON-able; numpy arrays allowed as values). Called once per change."""

    def prepare(self, candidates: Sequence[Candidate], states: Sequence[dict[str, Any]]) -> Any:
        """Combine the per-expert states of one candidate set into what ``route`` reads (e.g. one stacked
        matrix). Cached by the caller for as long as the set and its states are unchanged."""
        return states

    @abstractmethod
    async def route(self, query: str, candidates: Sequence[Candidate], prepared: Any, k: int) -> RouteDecision:
        """Score every candidate for ``query`` and choose up to ``k``; ``fallback=True`` when none qualifies."""


# Name -> router class; filled by one validated ``@ROUTERS.register`` per router.
ROUTERS: Registry[StrategyClass[GlobalRouter], RouterConfig] = Registry(
    "router", config_base=RouterConfig, params_field="router_params", param="router"
)


# -- small shared helpers ---------------------------------------------------------------------------


def softmax(scores: Iterable[float], temperature: float = 1.0) -> list[float]:
    values = list(scores)
    if not values:
        return []
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def top_k_decision(
    router: str,
    scores: dict[str, float],
    k: int,
    *,
    threshold: float | None,
    temperature: float,
    reason: str,
) -> RouteDecision:
    """The k best-scoring candidates at or above ``threshold``, weighted by a softmax of their scores."""
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    return top_k_of_array(router, list(scores), values, k, threshold=threshold, temperature=temperature, reason=reason)


def top_k_of_array(
    router: str,
    slugs: Sequence[str],
    scores: np.ndarray,
    k: int,
    *,
    threshold: float | None,
    temperature: float,
    reason: str,
) -> RouteDecision:
    """:func:`top_k_decision` on a score array aligned with ``slugs``: numpy selection, no sort of all
    candidates (compositions may have thousands and k is small); ties keep the earlier candidate."""
    rounded = np.round(scores.astype(np.float64, copy=False), 6)
    by_slug = dict(zip(slugs, rounded.tolist(), strict=True))
    eligible = np.arange(len(slugs)) if threshold is None else np.flatnonzero(scores >= threshold)
    if eligible.size == 0:
        best = f"{slugs[int(np.argmax(scores))]} at {float(scores.max()):.3f}" if len(slugs) else "no candidate"
        return RouteDecision(router, [], by_slug, f"no expert reached the threshold {threshold} (best: {best})", True)
    if eligible.size > k:
        # the k largest, then best first; a stable sort on the negated scores keeps declared order on ties
        part = eligible[np.argpartition(-scores[eligible], k - 1)[:k]]
        cut = scores[part].min()
        eligible = eligible[scores[eligible] >= cut]
    kept = eligible[np.argsort(-scores[eligible], kind="stable")][:k]
    weights = softmax([float(scores[i]) for i in kept], temperature)
    chosen = [(slugs[int(i)], round(w, 6)) for i, w in zip(kept, weights, strict=True)]
    return RouteDecision(router, chosen, by_slug, reason)
