"""``arrow``: data-free token routing by each adapter's top right singular vector (Ostapenko et al., 2024).

Per adapter and module the prototype v_e is the top right singular vector of B_e·A_e; a token x scores |x·v_e| (a
singular vector's sign is arbitrary), the top_k adapters are kept and their scores pass through a softmax with
temperature (``serving/mixture/scores.py``, which the engine runs). Defaults follow PEFT's ArrowConfig (top_k=3,
router_temperature=1.0).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from routers.query.base import require
from routers.token.base import TOKEN_ROUTERS, FitContext, TokenRouter, TokenRouterConfig
from serving.mixture.adapters import LoraAdapter
from serving.mixture.route import Route
from serving.mixture.scores import arrow_k, arrow_route

POWER_ITERS = 1000
POWER_TOL = 1e-7
_INIT_SEED = 0


def top_right_singular_vector(
    A: torch.Tensor, B: torch.Tensor, *, max_iters: int = POWER_ITERS, tol: float = POWER_TOL
) -> torch.Tensor:
    """Unit top right singular vector [in] of B·A (A [r, in], B [out, r]) by power iteration on
    v -> Aᵀ(Bᵀ(B(A v))), never forming B·A. Deterministic: a fixed-seed start vector, float64 iterations."""
    A64, B64 = A.detach().to(torch.float64), B.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(_INIT_SEED)
    v = torch.randn(A64.shape[1], generator=gen, dtype=torch.float64)
    v = v / v.norm()
    for _ in range(max_iters):
        w = A64.T @ (B64.T @ (B64 @ (A64 @ v)))
        norm = w.norm()
        if norm == 0:  # B·A = 0: no direction; a zero prototype scores 0 for every token
            return torch.zeros(A.shape[1], dtype=torch.float32)
        w = w / norm
        # AᵀBᵀBA is positive semi-definite, so the iterate does not flip sign once converged.
        done = bool((w - v).norm() < tol)
        v = w
        if done:
            break
    return v.to(torch.float32)


def arrow_prototypes(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Module -> prototype [in] of one adapter: pure, so it can be stored as the expert's router artifact."""
    return {module: top_right_singular_vector(w.A, w.B) for module, w in adapter.modules.items()}


class ArrowConfig(TokenRouterConfig, frozen=True):
    """Parameters of ``arrow`` (defaults: PEFT's ArrowConfig).

    top_k: adapters kept per token and module (>= 1).
    temperature: softmax temperature over the kept adapters' scores, which gives their weights (> 0).
    """

    top_k: int = 3
    temperature: float = 1.0

    def check(self) -> None:
        require(self.top_k >= 1, "top_k", "must be at least 1")
        require(self.temperature > 0, "temperature", "must be positive")


@TOKEN_ROUTERS.register
class ArrowRouter(TokenRouter):
    name = "arrow"
    config_cls = ArrowConfig
    help = "per token and module: top-k adapters by |x·v| with v the top right singular vector of B·A"

    config: ArrowConfig
    _cache: ClassVar[dict[str, dict[str, torch.Tensor]]] = {}  # adapter fingerprint -> prototypes

    def fit_adapter(self, adapter: LoraAdapter, context: FitContext | None = None) -> dict[str, torch.Tensor]:
        # Prototypes depend on the weights only (not on top_k / temperature, nor on any training data):
        # share them across routers.
        key = adapter.fingerprint
        if not key:
            return arrow_prototypes(adapter)
        if key not in self._cache:
            self._cache[key] = arrow_prototypes(adapter)
        return self._cache[key]

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        experts, weights = self.route_shared(
            x, state.unsqueeze(0), available.unsqueeze(0), None if bias is None else bias.unsqueeze(1)
        )
        return Route(experts[:, 0], weights[:, 0])

    def slot_params(self) -> dict[str, Any]:
        return {"kind": "arrow", "top_k": self.config.top_k, "temperature": self.config.temperature}

    def route_k(self, available: torch.Tensor) -> int:
        """Experts kept per token: top_k, capped by the fewest available experts of the modules."""
        return arrow_k(available, self.config.top_k)

    def route_shared(
        self,
        x: torch.Tensor,
        states: torch.Tensor,
        available: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        k: int | None = None,
        all_available: bool | None = None,
    ) -> Route:
        """``route`` for M modules that read the same ``x`` (``serving.mixture.scores.arrow_route``): experts
        and weights [tokens, M, k]."""
        cfg = self.config
        return arrow_route(x, states, available, cfg.top_k, cfg.temperature, bias, k=k, all_available=all_available)
