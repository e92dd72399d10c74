"""What every token-level router shares: the router interface and the registry. The route type and what the
mixture layer calls on a router (``MixtureRouter``, which ``TokenRouter`` implements) are in ``serving/mixture``.

A token-level router scores, for every token reaching one LoRA target module, the adapters stacked in that
module and keeps a few of them with mixing weights. Its per-adapter state (Arrow prototypes, PHATGOOSE gates)
is one vector per module, computed by ``fit_adapter`` from that adapter (plus, for routers that train, the
base model and the expert's training examples, passed in a ``FitContext``), so it can be stored once per
expert as a router artifact and reused by every composition containing the expert
(``routers/token/states.py``). ``state_key`` names what the stored state depends on: the router whose state
it is and a hash of only those config fields that change the fit (``state_fields``), so routing-only
parameters (top_k, temperature) share one stored state.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import torch

from core.strategies import Registry, StrategyClass
from routers.query.base import RouterConfig
from serving.mixture.route import Route

if TYPE_CHECKING:
    from registry.training_data import TrainingRow
    from serving.mixture.adapters import LoraAdapter


class TokenRouterConfig(RouterConfig, frozen=True):
    """Base of every token router's config (typed, validated by ``check``, hashed by ``digest``)."""


@dataclass(frozen=True)
class FitContext:
    """What a router that trains needs besides the adapter: the base model folder the adapter belongs to and
    the expert's own training examples. ``on_step`` (step, steps, loss) reports training progress."""

    base_dir: Path | None = None
    examples: Sequence[TrainingRow] = field(default=())
    on_step: Callable[[int, int, float], None] | None = None


class TokenRouter(ABC):
    """One token-level routing method. Subclasses set ``name``, ``config_cls`` and ``help``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TokenRouterConfig]]
    help: ClassVar[str]
    # True: fit_adapter trains on the expert's examples and needs FitContext(base_dir, examples).
    needs_training_data: ClassVar[bool] = False
    # The config fields the fitted state depends on; () means the adapter's weights alone (Arrow).
    state_fields: ClassVar[tuple[str, ...]] = ()
    # True: one state for the whole expert set, trained together by ``fit_composition`` (``mixer``) and
    # stored under the set, not per expert.
    joint: ClassVar[bool] = False

    def __init__(self, config: TokenRouterConfig | None = None) -> None:
        cfg = config if config is not None else self.config_cls()
        cfg.check()
        self.config = cfg

    @classmethod
    def query_part(cls, params: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """A query-level router this one also runs once per query, with its parameters (``glider``'s global
        bias is the ``instruct`` router): fitted with the composition, asked before the mixture decodes."""
        return None

    @classmethod
    def query_bias(cls, params: dict[str, Any], scores: list[float]) -> tuple[float, ...]:
        """The per-query bias, one value per expert, from the scores ``query_part``'s router gave them (called
        only when ``query_part`` names one)."""
        raise NotImplementedError(f"{cls.__name__} has no query-level part")

    def requires_training_data(self) -> bool:
        """Whether ``fit_adapter`` needs a FitContext with the base and training examples (a router that
        delegates its state to another one, like ``glider``, answers for that one)."""
        return type(self).needs_training_data

    def fit_trains(self) -> bool:
        """Whether fitting trains something (gates, a mixer): minutes rather than seconds, so compositions
        fit it in a background job (``jobs/fit.py``) rather than in the request that created them."""
        return self.requires_training_data() or type(self).joint

    def state_width(self, in_features: int) -> int:
        """Length of this router's state vector at a module with ``in_features`` inputs (one per input
        feature unless the router stores more, e.g. ``mixer``'s bias)."""
        return in_features

    def state_key(self) -> tuple[str, str]:
        """(router name, config hash) a fitted state is stored under: the hash covers only ``state_fields``,
        so configs differing in routing parameters alone share the stored state."""
        fields = {name: getattr(self.config, name) for name in self.state_fields}
        digest = hashlib.sha256(msgspec.json.encode(fields, order="sorted")).hexdigest()[:16]
        return self.name, digest

    @abstractmethod
    def fit_adapter(self, adapter: LoraAdapter, context: FitContext | None = None) -> dict[str, torch.Tensor]:
        """This adapter's routing state: module name -> one float32 vector of the module's in_features.
        Deterministic given the adapter, ``context`` and the ``state_fields`` of the config, so the result
        can be stored as an artifact (``state_key``)."""

    def fit_composition(
        self, adapters: Sequence[LoraAdapter], context: FitContext | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """A ``joint`` router's states for ``adapters`` fitted together, one per adapter, in order."""
        raise NotImplementedError(f"{self.name} fits one state per adapter (fit_adapter)")

    def examples_digest(self) -> str:
        """A ``joint`` router's hash of the examples it trains on, when they come with its config."""
        return ""

    def slot_params(self) -> dict[str, Any] | None:
        """How moerge's vLLM op runs this router inside one adapter slot (``serving/mixture/slot.py``:
        ``SlotRouting``'s kind, top_k, temperature and request, its ranks filled from the adapters), or None when it
        cannot (the composition then keeps the torch engine)."""
        return None

    @abstractmethod
    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        """Choose experts for every row of ``x`` [tokens, in]. ``state`` [E, in] stacks the adapters' vectors
        of this module; ``available`` [E] (bool) is False where an adapter does not adapt this module, and such
        an adapter must never be chosen. ``bias`` [tokens, E], when given, is added to the token scores before
        the top-k (GLIDER's global, per-sequence preference for some experts)."""


# Name -> token router class; filled by one validated ``@TOKEN_ROUTERS.register`` per router.
TOKEN_ROUTERS: Registry[StrategyClass[TokenRouter], TokenRouterConfig] = Registry(
    "token router", config_base=TokenRouterConfig, params_field="router_params", param="router"
)
