"""``phatgoose``: token routing by gates trained after the fact, one per expert and module (Muqeeth et al., 2024,
"Learning to Route Among Specialized Experts for Zero-Shot Generalization").

Gate training (once per expert, stored by ``routers/token/states.py``): with the base model and the expert's
LoRA frozen, every LoRA target module computes y = W·u + σ(vᵀu)·scale·B·A·u and only the gate vectors v (one
per module, initialised to zeros so every gate starts half open, σ = 0.5, as in the paper) are trained for a
few steps of next-token loss on the expert's own training examples, scored on the answer tokens only (the
demo recipe's chat formatting and masking: ``evals.recipe.encode_chat`` and ``answer_loss``).

Routing: at a module, a token's activation u and every expert's gate v are standardized (each vector minus
its mean, divided by its standard deviation), each expert scores û·v̂ / √d, the optional bias (GLIDER) is
added, a softmax runs over the experts that adapt this module, the ``top_k`` (default 2) are kept and their
probabilities renormalized to sum to 1.

Cost (``bench/gate_training.py``): every step runs the base forward and a backward through it (no weight
gradients), so it costs about two thirds of a LoRA training step on the same tokens. On SmolLM2-135M with
the defaults (100 steps of 4 chat examples, ~75 tokens each) it took 356 s with one thread on this 2-core
machine while other jobs kept it loaded (load average 4-5; 30 steps: 56 s at load ~4); unloaded it should be
near 2 minutes, by the DESIGN.md LoRA-step figure. With two torch threads on the loaded machine the same run
did not finish in 15 minutes (OpenMP threads spinning against other processes): torch's thread count is
process-wide and is left to the caller. Lower ``batch_size`` or ``steps`` to go faster.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec
import torch
from torch import nn

from registry.errors import ValidationFailed
from registry.training_data import TrainingRow
from routers.query.base import RouterConfig, require
from routers.token.adapters import LoraAdapter, refused
from routers.token.base import TOKEN_ROUTERS, FitContext, Route, TokenRouter, TokenRouterConfig, softmax_of_sorted

STD_EPS = 1e-6  # a constant vector (a zero gate) standardizes to zeros instead of dividing by 0


class GateTrainingConfig(RouterConfig, frozen=True):
    """How the gates are trained; every field changes the stored gates (it is hashed into their key).

    steps: optimizer steps (1..10000; the paper trains about 100).
    lr: Adam learning rate (> 0, at most 1).
    batch_size: examples per step (1..256).
    max_length: longest example in tokens, prompt + answer (16..4096); longer ones are skipped.
    seed: seeds the order the examples are drawn in.
    """

    steps: int = 100
    lr: float = 1e-2
    batch_size: int = 4
    max_length: int = 192
    seed: int = 0

    def check(self) -> None:
        require(1 <= self.steps <= 10_000, "training.steps", "must lie between 1 and 10000")
        require(math.isfinite(self.lr) and 0 < self.lr <= 1, "training.lr", "must be positive (at most 1)")
        require(1 <= self.batch_size <= 256, "training.batch_size", "must lie between 1 and 256")
        require(16 <= self.max_length <= 4096, "training.max_length", "must lie between 16 and 4096")
        require(self.seed >= 0, "training.seed", "must be 0 or more")


class PhatgooseConfig(TokenRouterConfig, frozen=True):
    """Parameters of ``phatgoose``: ``top_k`` experts per token and module (>= 1; the paper uses 2) and
    ``training`` (GateTrainingConfig), the only part the stored gates depend on."""

    top_k: int = 2
    training: GateTrainingConfig = msgspec.field(default_factory=GateTrainingConfig)

    def check(self) -> None:
        require(self.top_k >= 1, "top_k", "must be at least 1")
        self.training.check()


def standardize(v: torch.Tensor) -> torch.Tensor:
    """Each row (last dimension) minus its mean, divided by its standard deviation (Bessel-corrected, as
    torch.std); a constant row becomes zeros."""
    centered = v - v.mean(dim=-1, keepdim=True)
    return centered / (v.std(dim=-1, keepdim=True) + STD_EPS)


def phatgoose_scores(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """[tokens, E] scores standardize(x)·standardize(gates)ᵀ / √d for x [tokens, d], gates [E, d]."""
    d = x.shape[-1]
    return (standardize(x) @ standardize(gates.to(x.dtype)).T) / math.sqrt(d)


def phatgoose_route(
    x: torch.Tensor, gates: torch.Tensor, available: torch.Tensor, top_k: int, bias: torch.Tensor | None = None
) -> Route:
    """Scores (+ bias), softmax over the available experts, top_k, kept probabilities renormalized."""
    scores = phatgoose_scores(x, gates)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if not bool(available.all()):
        scores = scores.masked_fill(~available.to(scores.device), float("-inf"))
    k = min(top_k, int(available.sum()))
    # softmax, top-k, renormalize == a softmax over the kept scores alone (the dropped terms cancel)
    top, experts = scores.topk(k, dim=-1)
    return Route(experts, softmax_of_sorted(top))


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
    # Heavy imports stay local (importing the router registry must not load transformers).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.recipe import answer_loss, encode_chat

    config = config or GateTrainingConfig()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Draw rows in a seeded order and encode only as many as the steps use (steps x batch_size at most),
    # skipping those longer than max_length.
    rng = random.Random(config.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    wanted = config.steps * config.batch_size
    data: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for i in order:
        if len(data) >= wanted:
            break
        row = examples[i]
        try:
            data.append(encode_chat(tokenizer, list(row.messages), row.answer, config.max_length))
        except ValueError:
            skipped += 1
    if not data:
        raise ValidationFailed(
            f"adapter {adapter.name!r}: none of its {len(examples)} training examples fits in "
            f"max_length={config.max_length} tokens",
            param="router_params.training.max_length",
        )

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()  # no dropout: the gates see the activations routing will see
    gated: dict[str, GatedLoraLinear] = {}
    for module, w in adapter.modules.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise refused(adapter.name, f"it targets {module}, which is not a Linear layer of the base")
        if (layer.in_features, layer.out_features) != (w.A.shape[1], w.B.shape[0]):
            raise refused(adapter.name, f"module {module} does not fit the base layer's shape")
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gated[module] = GatedLoraLinear(layer, w.A, w.B, w.scale)
        setattr(parent, leaf, gated[module])

    params = [g.gate for g in gated.values()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    losses: list[float] = []
    cursor = 0
    for step in range(1, config.steps + 1):
        batch = [data[(cursor + j) % len(data)] for j in range(min(config.batch_size, len(data)))]
        cursor = (cursor + len(batch)) % len(data)
        loss = answer_loss(model, batch, pad_id)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"gate training of {adapter.name!r} diverged at step {step} (loss {losses[-1]})")
        if on_step is not None:
            on_step(step, config.steps, losses[-1])
    gates = {name: g.gate.detach().to(torch.float32).clone() for name, g in gated.items()}
    return GateTraining(gates, losses, len(data), skipped, time.perf_counter() - started)


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

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        return phatgoose_route(x, state, available, self.config.top_k, bias)
