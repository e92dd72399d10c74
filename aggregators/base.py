"""What every aggregator shares: the experts' answers in, one answer out; configs and the registry.

Aggregators are pure: ``vote`` combines the answers itself; model-based aggregators (``synthesize``,
``select``) build the chat messages for an aggregator model (``prompt``) and turn that model's output
into the final answer (``finish``). The serving layer runs the model, so streaming, batching and
failures stay in one place.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from registry.errors import ValidationFailed
from registry.schemas import convert_params
from serving.engine import FusedMember, Fusion


@dataclass(frozen=True)
class ExpertAnswer:
    """One chosen expert's answer; ``error`` set (and ``text`` empty) when that expert failed."""

    slug: str
    weight: float
    text: str = ""
    error: str | None = None
    part: str | None = None  # a decomposed query: the part this answer is to

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


class AggregatorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    def check(self) -> None:
        """Raise ValidationFailed(param="aggregator_params.<field>") when a value is out of range."""

    def digest(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self, order="sorted")).hexdigest()[:16]


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

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config

    def model_slug(self) -> str | None:
        """The aggregator model's slug from the config (None: the composition's fallback model)."""
        return getattr(self.config, "model", None)

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

    @abstractmethod
    def max_tokens(self, requested: int) -> int:
        """New tokens the aggregator model may write, given the request's max_tokens."""


@dataclass(frozen=True)
class AggregatorEntry:
    name: str
    cls: type[Aggregator]
    config_cls: type[AggregatorConfig]
    help: str


class AggregatorRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, AggregatorEntry] = {}

    def register(self, cls: type[Aggregator]) -> type[Aggregator]:
        name = getattr(cls, "name", "")
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"{cls.__name__}: aggregator name must be a non-empty identifier, got {name!r}")
        if name in self._entries:
            raise ValueError(f"aggregator {name!r} is registered twice ({cls.__name__})")
        if not isinstance(getattr(cls, "config_cls", None), type) or not issubclass(cls.config_cls, AggregatorConfig):
            raise ValueError(f"{cls.__name__}: config_cls must subclass AggregatorConfig")
        if not getattr(cls, "help", ""):
            raise ValueError(f"{cls.__name__}: give the aggregator a one-line help text")
        self._entries[name] = AggregatorEntry(name, cls, cls.config_cls, cls.help)
        return cls

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> AggregatorEntry:
        if name not in self._entries:
            raise ValidationFailed(f"unknown aggregator {name!r}; known: {', '.join(self.names())}", param="aggregator")
        return self._entries[name]

    def config(self, name: str, params: dict[str, Any]) -> AggregatorConfig:
        config: AggregatorConfig = convert_params(params, self.get(name).config_cls, "aggregator_params")
        config.check()
        return config

    def build(self, name: str, params: dict[str, Any]) -> Aggregator:
        return self.get(name).cls(self.config(name, params))


AGGREGATORS = AggregatorRegistry()
