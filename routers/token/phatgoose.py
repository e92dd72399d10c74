"""``phatgoose``: token routing by gates trained after the fact, one per expert and module (Muqeeth et al., 2024,
"Learning to Route Among Specialized Experts for Zero-Shot Generalization").

Gate training (once per expert, stored by ``routers/token/states.py``): with the base model and the expert's
LoRA frozen, every LoRA target module computes y = W·u + σ(vᵀu)·scale·B·A·u and only the gate vectors v (one
per module, initialised to zeros so every gate starts half open, σ = 0.5, as in the paper) are trained for a
few steps of next-token loss on the expert's own training examples, scored on the answer tokens only (the
demo recipe's chat formatting and masking: ``evals.recipe.encode_chat`` and ``answer_loss``).

Routing (``serving/mixture/scores.py``, which the engine runs): at a module, a token's activation u and every expert's
gate v are standardized (each vector minus its mean, divided by its standard deviation), each expert scores û·v̂ / √d,
the optional bias (GLIDER) is added, a softmax runs over the experts that adapt this module, the ``top_k`` (default 2)
are kept and their probabilities renormalized to sum to 1.

Cost (``bench/gate_training.py``): every step runs the base forward and a backward through it (no weight
gradients), so it costs about two thirds of a LoRA training step on the same tokens. On SmolLM2-135M with
the defaults (100 steps of 4 chat examples, ~75 tokens each) it took 356 s with one thread on this 2-core
machine while other jobs kept it loaded (load average 4-5; 30 steps: 56 s at load ~4); unloaded it should be
near 2 minutes, by the DESIGN.md LoRA-step figure. With two torch threads on the loaded machine the same run
did not finish in 15 minutes (OpenMP threads spinning against other processes): torch's thread count is
process-wide and is left to the caller. Lower ``batch_size`` or ``steps`` to go faster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import torch
from torch import nn

from core.errors import ValidationFailed
from registry.training_data import TrainingRow
from routers.query.base import require
from routers.token.base import TOKEN_ROUTERS, FitContext, TokenRouter, TokenRouterConfig
from routers.token.training import GateTrainingConfig, train_layers
from serving.mixture.adapters import LoraAdapter
from serving.mixture.route import Route
from serving.mixture.scores import phatgoose_route


class PhatgooseConfig(TokenRouterConfig, frozen=True):
    """Parameters of ``phatgoose``.

    top_k: experts kept per token and module (>= 1; the paper uses 2).
    training: how the gates are trained (steps, lr, batch_size, max_length, seed); the only part the stored
        gates depend on.
    """

    top_k: int = 2
    training: GateTrainingConfig = msgspec.field(default_factory=GateTrainingConfig)

    def check(self) -> None:
        require(self.top_k >= 1, "top_k", "must be at least 1")
        self.training.check()


# -- gate training ------------------------------------------------------------------------------------


class GatedLoraLinear(nn.Module):
    """Training-time layer: y = W·u + σ(vᵀu)·scale·B·A·u with W, A, B frozen and only ``gate`` (v) trained."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", A.to(base.weight.dtype), persistent=False)
        self.register_buffer("B", B.to(base.weight.dtype), persistent=False)
        self.scale = scale
        self.gate = nn.Parameter(torch.zeros(base.in_features, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x @ self.gate).unsqueeze(-1)
        return self.base(x) + (g * self.scale) * ((x @ self.A.T) @ self.B.T)


@dataclass
class GateTraining:
    gates: dict[str, torch.Tensor]  # module -> float32 [in_features]
    losses: list[float]  # answer-token loss per step
    examples: int  # rows used (those within max_length)
    skipped: int  # rows longer than max_length
    seconds: float


def train_gates(
    adapter: LoraAdapter,
    base_dir: Path | str,
    examples: Sequence[TrainingRow],
    config: GateTrainingConfig | None = None,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
) -> GateTraining:
    """Train one gate vector per LoRA target module of ``adapter`` on ``examples`` (TrainingRow: messages
    before the answer, and the answer), base and adapter frozen. CPU heavy: run it off the event loop."""
    config = config or GateTrainingConfig()
    weights = adapter.modules
    trained = train_layers(
        base_dir,
        examples,
        config,
        f"adapter {adapter.name!r}",
        weights,
        blame=lambda _: adapter.name,
        shape=lambda m: (weights[m].A.shape[1], weights[m].B.shape[0]),
        make=lambda m, layer: GatedLoraLinear(layer, weights[m].A, weights[m].B, weights[m].scale),
        on_step=on_step,
    )
    gates = {name: _gate(g) for name, g in trained.layers.items()}
    return GateTraining(gates, trained.losses, trained.examples, trained.skipped, trained.seconds)


def _gate(layer: nn.Module) -> torch.Tensor:
    assert isinstance(layer, GatedLoraLinear)
    return layer.gate.detach().to(torch.float32).clone()


@TOKEN_ROUTERS.register
class PhatgooseRouter(TokenRouter):
    name = "phatgoose"
    config_cls = PhatgooseConfig
    help = "per token and module: top-k adapters by standardized u·v/√d with v a gate trained on the expert's data"
    needs_training_data = True
    state_fields = ("training",)

    config: PhatgooseConfig
    last_training: ClassVar[GateTraining | None] = None  # the most recent fit (logs, tests, benchmarks)

    def fit_adapter(self, adapter: LoraAdapter, context: FitContext | None = None) -> dict[str, torch.Tensor]:
        if context is None or context.base_dir is None or not context.examples:
            raise ValidationFailed(
                f"phatgoose needs the base model and training examples of adapter {adapter.name!r} to train "
                "its gates: attach training data to the expert (POST /api/experts/{ref}/training-data) and "
                "get the states through routers.token.states",
                param="experts",
                code="no_training_data",
            )
        result = train_gates(adapter, context.base_dir, context.examples, self.config.training, on_step=context.on_step)
        type(self).last_training = result
        return result.gates

    def slot_params(self) -> dict[str, Any]:
        return {"kind": "phatgoose", "top_k": self.config.top_k}

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        return phatgoose_route(x, state, available, self.config.top_k, bias)
