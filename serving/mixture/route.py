"""What the mixture layer needs of a token router: the per-token route it returns and the calls it makes.

The routers themselves (configs, fitting, stored states) live in ``routers/token``; the engine receives one
already built (``serving.engine.TokenMixture.make_router``), so serving never imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from serving.mixture.adapters import LoraAdapter


class Route(NamedTuple):
    """Per-token choice at one module: ``experts`` [tokens, k] (indices into the stack) and ``weights``
    [tokens, k] (the mixing coefficients c_e)."""

    experts: torch.Tensor
    weights: torch.Tensor


def softmax_of_sorted(top: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the last axis of ``top``, whose first column is each row's maximum (``topk``'s sorted
    output). Written out because ``torch.softmax`` enters an OpenMP parallel region even for a handful of
    values, which on a busy 2-core CPU cost up to ~8 ms a call (vs ~2 us single-threaded); exp / sum does not."""
    logits = top - top[..., :1]
    if temperature != 1.0:
        logits = logits / temperature
    e = logits.exp()
    return e / e.sum(dim=-1, keepdim=True)


WEIGHTED = "weighted"  # the router name of a weighted mixture (``TokenMixture.router``)


class WeightedRouter:
    """A weighted mixture as the mixture layer runs it: every adapter on every token, with the weights its
    sequence's request brought (given as the layer's per-sequence ``bias``; NaN rows or none: equal weights).
    The torch engine's reference for what moerge's vLLM op does with a weighted slot."""

    def state_width(self, in_features: int) -> int:
        return 1

    def fit_adapter(self, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        return {}

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        tokens, experts = x.shape[0], state.shape[0]
        uniform = x.new_full((tokens, experts), 1.0 / experts)
        weights = uniform if bias is None else torch.where(torch.isnan(bias), uniform, bias.to(x.dtype))
        return Route(torch.arange(experts, device=x.device).expand(tokens, experts), weights)


class MixtureRouter(Protocol):
    """A token router as the mixture layer calls it (``routers.token.base.TokenRouter`` implements it). A router
    may also offer ``route_k(available)`` and ``route_shared(...)`` to route the modules sharing an input in
    one call (``arrow``); the layer uses them when present."""

    def state_width(self, in_features: int) -> int:
        """Length of the router's state vector at a module with ``in_features`` inputs."""
        ...

    def fit_adapter(self, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        """The adapter's routing state (module -> vector), for mixtures built without stored states."""
        ...

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        """Choose experts for every row of ``x`` [tokens, in] among the stacked ``state`` [E, in] rows whose
        ``available`` [E] is True; ``bias`` [tokens, E] is added to the scores before the top-k."""
        ...
