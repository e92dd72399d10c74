"""What every token-level router shares: the route type, the router interface and the registry.

A token-level router scores, for every token reaching one LoRA target module, the adapters stacked in that
module and keeps a few of them with mixing weights. Its per-adapter state (Arrow prototypes, PHATGOOSE gates)
is one vector per module, computed by ``fit_adapter`` from that adapter alone, so it can be stored once per
expert as a router artifact and reused by every composition containing the expert.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from registry.errors import ValidationFailed
from registry.schemas import convert_params
from routers.query.base import RouterConfig

if TYPE_CHECKING:
    from routers.token.adapters import LoraAdapter


class Route(NamedTuple):
    """Per-token choice at one module: ``experts`` [tokens, k] (indices into the stack) and ``weights``
    [tokens, k] (the mixing coefficients c_e)."""

    experts: torch.Tensor
    weights: torch.Tensor


class TokenRouterConfig(RouterConfig, frozen=True):
    """Base of every token router's config (typed, validated by ``check``, hashed by ``digest``)."""


class TokenRouter(ABC):
    """One token-level routing method. Subclasses set ``name``, ``config_cls`` and ``help``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TokenRouterConfig]]
    help: ClassVar[str]

    def __init__(self, config: TokenRouterConfig | None = None) -> None:
        cfg = config if config is not None else self.config_cls()
        cfg.check()
        self.config = cfg

    @abstractmethod
    def fit_adapter(self, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        """This adapter's routing state: module name -> one float32 vector of the module's in_features.
        Pure (depends on the adapter's weights only), so the result can be stored as an artifact."""

    @abstractmethod
    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        """Choose experts for every row of ``x`` [tokens, in]. ``state`` [E, in] stacks the adapters' vectors
        of this module; ``available`` [E] (bool) is False where an adapter does not adapt this module, and such
        an adapter must never be chosen. ``bias`` [tokens, E], when given, is added to the token scores before
        the top-k (GLIDER's global, per-sequence preference for some experts)."""


@dataclass(frozen=True)
class TokenRouterEntry:
    name: str
    cls: type[TokenRouter]
    config_cls: type[TokenRouterConfig]
    help: str


class TokenRouterRegistry:
    """Name -> token router class; filled by one validated ``register`` call per router."""

    def __init__(self) -> None:
        self._entries: dict[str, TokenRouterEntry] = {}

    def register(self, cls: type[TokenRouter]) -> type[TokenRouter]:
        name = getattr(cls, "name", "")
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"{cls.__name__}: router name must be a non-empty identifier, got {name!r}")
        if name in self._entries:
            raise ValueError(f"token router {name!r} is registered twice ({cls.__name__})")
        config_cls = getattr(cls, "config_cls", None)
        if not isinstance(config_cls, type) or not issubclass(config_cls, TokenRouterConfig):
            raise ValueError(f"{cls.__name__}: config_cls must subclass TokenRouterConfig")
        if not getattr(cls, "help", ""):
            raise ValueError(f"{cls.__name__}: give the router a one-line help text")
        self._entries[name] = TokenRouterEntry(name, cls, config_cls, cls.help)
        return cls

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> TokenRouterEntry:
        if name not in self._entries:
            raise ValidationFailed(f"unknown token router {name!r}; known: {', '.join(self.names())}", param="router")
        return self._entries[name]

    def config(self, name: str, params: dict[str, Any]) -> TokenRouterConfig:
        """Parse and check ``params`` for router ``name``; errors name the offending field."""
        config: TokenRouterConfig = convert_params(params, self.get(name).config_cls, "router_params")
        config.check()
        return config

    def build(self, name: str, params: dict[str, Any] | None = None) -> TokenRouter:
        return self.get(name).cls(self.config(name, params or {}))


TOKEN_ROUTERS = TokenRouterRegistry()
