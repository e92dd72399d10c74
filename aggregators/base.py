"""What every aggregator shares: the experts' answers in, one answer out; configs and the registry.

Aggregators are pure: ``vote`` combines the answers itself; model-based aggregators (``synthesize``,
``select``) build the chat messages for an aggregator model (``prompt``) and turn that model's output
into the final answer (``finish``). The serving layer runs the model, so streaming, batching and
failures stay in one place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.errors import ValidationFailed
from core.strategies import Registry, StrategyClass, StrategyConfig
from serving.engine import FusedMember, Fusion


@dataclass(frozen=True)
class ExpertAnswer:
    """One chosen expert's answer; ``error`` set (and ``text`` empty) when that expert failed."""

    slug: str
    weight: float
    text: str = ""
    error: str | None = None
    part: str | None = None  # a decomposed query: the part this answer is to
    tool_calls: tuple[dict[str, Any], ...] = ()  # the calls the expert answered with (OpenAI's shape), if any
    prompt_tokens: int = 0  # this expert's generation's usage (0 where it failed, or decoded fused)
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Aggregation:
    """The final answer, and which experts it came from (for the headers and the playground)."""

    text: str
    chosen: list[str] = field(default_factory=list)  # experts whose answer was kept or agreed
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    tool_calls: tuple[dict[str, Any], ...] = ()  # the kept answer's tool calls (an aggregator that keeps one whole)


class AggregatorConfig(StrategyConfig, frozen=True):
    """Base of every aggregator's config; ``check`` raises ValidationFailed(param="aggregator_params.<field>")."""


def require(condition: bool, field_name: str, reason: str) -> None:
    if not condition:
        raise ValidationFailed(f"aggregator_params.{field_name}: {reason}", param=f"aggregator_params.{field_name}")


class Aggregator(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type[AggregatorConfig]]
    help: ClassVar[str]
    uses_model: ClassVar[bool] = False  # True: the serving layer runs ``prompt`` on ``model_slug``
    # True: the aggregator model's output is the answer as written, so a stream can pass it through;
    # False: the answer is known only once ``finish`` has read the whole output (sent as one chunk).
    streams_output: ClassVar[bool] = False
    # True: can combine answers to different parts of a query (a composition with `decompose` needs it);
    # vote and select compare answers to one question and cannot.
    combines_parts: ClassVar[bool] = False
    # True: the chosen experts decode one answer together (``fusion`` builds the engine's fused request)
    # instead of answering each and being combined; only engines with ``fuses_logits`` (torch) run it.
    fuses_logits: ClassVar[bool] = False
    # True: the chosen LoRA adapters are applied together in one generation with per-query weights (``weights``)
    # instead of answering each (``weighted``); the composition layer answers with one weighted mixture.
    merges_adapters: ClassVar[bool] = False
    # True: compares answers as parsed JSON when a request asks for JSON or tool calls (``for_structured``), so the
    # aggregate keeps the schema and the calls; aggregators that read or write text cannot take tool calls.
    compares_structured: ClassVar[bool] = False

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config

    def model_slug(self) -> str | None:
        """The aggregator model's slug from the config (None: the composition's fallback model)."""
        return getattr(self.config, "model", None)

    def for_structured(self) -> Aggregator:
        """This aggregator as it combines answers that are JSON values or tool calls (``compares_structured``)."""
        return self

    def combine(self, query: str, answers: list[ExpertAnswer]) -> Aggregation:
        """For aggregators that do not use a model."""
        raise NotImplementedError

    def prompt(self, query: str, answers: list[ExpertAnswer]) -> list[dict[str, str]]:
        """For model-based aggregators: the messages for the aggregator model."""
        raise NotImplementedError

    def finish(self, query: str, answers: list[ExpertAnswer], model_output: str) -> Aggregation:
        """For model-based aggregators: the final answer from the aggregator model's output."""
        raise NotImplementedError

    def fusion(self, members: Sequence[FusedMember]) -> Fusion:
        """For aggregators with ``fuses_logits``: the fused request's spec for the chosen experts."""
        raise NotImplementedError

    def weights(self, chosen: Sequence[tuple[str, float]]) -> dict[str, float]:
        """For aggregators with ``merges_adapters``: each adapter's weight from the chosen (slug, score) pairs."""
        raise NotImplementedError

    @abstractmethod
    def max_tokens(self, requested: int) -> int:
        """New tokens the aggregator model may write, given the request's max_tokens."""


# Name -> aggregator class; filled by one validated ``@AGGREGATORS.register`` per aggregator.
AGGREGATORS: Registry[StrategyClass[Aggregator], AggregatorConfig] = Registry(
    "aggregator", config_base=AggregatorConfig, params_field="aggregator_params", param="aggregator"
)
