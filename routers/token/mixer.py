"""``mixer``: a token router trained for one composition on a few labelled examples of its target task, over
frozen pre-trained LoRA experts (the second paradigm of LoRA-Mixer, Li et al., 2025: only the router learns).

Routing (``serving/mixture/scores.py``, which the engine runs): at every LoRA target module, each expert e has a router
row (w_e, b_e) and a token's activation u gets the gate g_e = σ(w_e·u/√d + b_e); the ``top_k`` experts by gate are kept
and act with their gates as the mixing weights, *not* renormalized: the gates need not sum to 1. That is the point of
this router. On the demo's composite tasks the two skills compose as a near-constant mix that favours the second skill
(json 0.4 + dates 0.8 on ``json_dates``) and that a softmax over experts (``phatgoose``, ``arrow``, ``glider``) cannot
express.

Training (once per composition, stored by ``routers/token/states.py``): base and adapters frozen, every target
module computes y = W·u + Σ_e g_e(u)·scale_e·B_e·A_e·u over all the composition's experts (dense), and only the
router rows are trained on the answer-token loss of the examples (the demo recipe's chat formatting and
masking, as for PHATGOOSE's gates: ``routers/token/training.py``). The w_e start at zero and the b_e at
logit(``init``), so before training every expert acts with the same constant weight ``init``.

The examples are the composition's own: ``examples`` (``[{"prompt", "answer"}, ...]``, the shape ``kshot``
takes) or ``task``, the name of an example source (``routers/examples.py``: the demo installs every evals
task, whose seeded train split gives ``task_examples`` of them). The stored state depends on the whole expert
set and on the examples, so it is keyed by both (``joint``).

Stored form: per expert and module one vector [in_features + 1], w_e followed by b_e (``state_width``).

Cost: a training step runs the base forward and backward plus every expert's LoRA path at every module;
with the defaults (100 steps of 4 examples, 64 examples of ``json_dates``) over two SmolLM2-135M experts it
took 6.5 min on one thread of this 2-core machine while other jobs loaded it. Routing costs what
``phatgoose`` does (one [E, d] product per module and token). The router rows, d + 1 numbers per expert and
module (about 0.3M for two SmolLM2 experts, an eighth of one rank-8 LoRA), are themselves trained on the task:
trained the same way over ``dates-lora`` alone they reach 37% on ``json_dates`` held-out, against 72% over both
experts (n=100), so the gain comes from composing the two experts, not from the router alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import torch
from torch import nn

from core.errors import ValidationFailed
from registry.training_data import TrainingRow
from routers.examples import example_rows, example_source_names
from routers.query.base import require
from routers.query.kshot import KShotExample
from routers.token.base import TOKEN_ROUTERS, FitContext, TokenRouter, TokenRouterConfig
from routers.token.training import GateTrainingConfig, train_layers
from serving.mixture.adapters import LoraAdapter, stack_module
from serving.mixture.route import Route
from serving.mixture.scores import mixer_gates, mixer_route

MAX_EXAMPLES = 4096


class MixerConfig(TokenRouterConfig, frozen=True):
    """Parameters of ``mixer``.

    top_k: experts kept per token and module (>= 1), by gate; their gates are their weights.
    init: every expert's gate before training (0 < init < 1).
    examples: labelled examples of the target task, each ``{"prompt", "answer"}`` (at most 4096) ...
    task: ... or the name of an example source giving them (the demo's: every evals task's train split).
    task_examples: how many examples ``task`` gives (1..4096).
    training: how the router is trained (steps, lr, batch_size, max_length, seed).
    Everything but top_k changes the trained router (it is hashed into the stored state's key).
    """

    top_k: int = 2
    init: float = 0.5
    examples: tuple[KShotExample, ...] = ()
    task: str = ""
    task_examples: int = 64
    training: GateTrainingConfig = msgspec.field(default_factory=lambda: GateTrainingConfig(lr=5e-2))

    def check(self) -> None:
        require(self.top_k >= 1, "top_k", "must be at least 1")
        require(math.isfinite(self.init) and 0 < self.init < 1, "init", "must lie strictly between 0 and 1")
        require(bool(self.examples) != bool(self.task), "examples", "give either examples or a task (not both)")
        require(len(self.examples) <= MAX_EXAMPLES, "examples", f"at most {MAX_EXAMPLES} examples")
        for i, example in enumerate(self.examples):
            require(bool(example.prompt.strip()), f"examples[{i}].prompt", "must not be empty")
            require(bool(example.answer.strip()), f"examples[{i}].answer", "must not be empty")
        if self.task:
            known = example_source_names()
            require(self.task in known, "task", f"unknown task {self.task!r}; known: {', '.join(known) or 'none'}")
        require(1 <= self.task_examples <= MAX_EXAMPLES, "task_examples", f"must lie between 1 and {MAX_EXAMPLES}")
        self.training.check()

    def rows(self) -> list[TrainingRow]:
        """The training examples as chat rows: ``examples``, or the first ``task_examples`` of the example source
        ``task`` names (``routers/examples.py``: the demo installs each evals task's train split)."""
        if self.task:
            return example_rows(self.task, self.task_examples)
        return [TrainingRow.from_prompt(e.prompt, e.answer) for e in self.examples]


class MixerLoraLinear(nn.Module):
    """Training-time layer: y = W·u + Σ_e σ(w_e·u/√d + b_e)·scale_e·B_e·A_e·u, only w and b trained."""

    A: torch.Tensor  # [E*r, in]
    B: torch.Tensor  # [out, E*r]
    scale: torch.Tensor  # [E]

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, init: float) -> None:
        super().__init__()
        self.base = base
        dtype = base.weight.dtype
        experts, rank = A.shape[0], A.shape[1]
        # Flattened, so each side is one matmul: A [E*r, in], B [out, E*r].
        self.register_buffer("A", A.reshape(experts * rank, -1).to(dtype), persistent=False)
        self.register_buffer("B", B.permute(1, 0, 2).reshape(B.shape[1], experts * rank).to(dtype), persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)
        self.rank = rank
        self.weight = nn.Parameter(torch.zeros(experts, base.in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.full((experts,), math.log(init / (1 - init)), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = mixer_gates(x, self.weight, self.bias) * self.scale  # [..., E]
        low = (x @ self.A.T) * g.repeat_interleave(self.rank, dim=-1)  # [..., E*r]
        return self.base(x) + low @ self.B.T


@dataclass
class MixerTraining:
    states: list[dict[str, torch.Tensor]]  # per adapter: module -> float32 [in_features + 1] (w_e, b_e)
    losses: list[float]  # answer-token loss per step
    examples: int  # rows used (those within max_length)
    skipped: int  # rows longer than max_length
    seconds: float


def train_mixer(
    adapters: Sequence[LoraAdapter],
    base_dir: Path | str,
    examples: Sequence[TrainingRow],
    config: GateTrainingConfig | None = None,
    *,
    init: float = 0.5,
    on_step: Callable[[int, int, float], None] | None = None,
) -> MixerTraining:
    """Train the router rows of every LoRA target module of ``adapters`` (jointly) on ``examples``, base and
    adapters frozen. CPU heavy: run it off the event loop."""
    config = config or GateTrainingConfig()
    targets = sorted({m for a in adapters for m in a.modules})

    def blame(module: str) -> str:
        return next(a.name for a in adapters if module in a.modules)

    def shape(module: str) -> tuple[int, int]:
        w = next(a.modules[module] for a in adapters if module in a.modules)
        return int(w.A.shape[1]), int(w.B.shape[0])

    def make(module: str, layer: nn.Linear) -> nn.Module:
        stack = stack_module(adapters, module, layer.in_features, layer.out_features, layer.weight.dtype)
        return MixerLoraLinear(layer, stack.A, stack.B, stack.scale, init)

    owner = "mixer of " + ", ".join(repr(a.name) for a in adapters)
    trained = train_layers(base_dir, examples, config, owner, targets, blame, shape, make, on_step)
    states: list[dict[str, torch.Tensor]] = [{} for _ in adapters]
    for module, layer in trained.layers.items():
        assert isinstance(layer, MixerLoraLinear)
        rows = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], dim=1).to(torch.float32)
        for e, adapter in enumerate(adapters):
            if module in adapter.modules:
                states[e][module] = rows[e].clone()
    return MixerTraining(states, trained.losses, trained.examples, trained.skipped, trained.seconds)


@TOKEN_ROUTERS.register
class MixerRouter(TokenRouter):
    name = "mixer"
    config_cls = MixerConfig
    help = "per token and module: experts weighted by sigmoid gates (not summing to 1) trained on the task's examples"
    joint = True  # one state for the whole expert set, trained together (states.py keys it by the set)
    state_fields = ("init", "examples", "task", "task_examples", "training")

    config: MixerConfig
    last_training: ClassVar[MixerTraining | None] = None  # the most recent fit (logs, tests)

    def examples_digest(self) -> str:
        """sha256 of the training examples themselves (a task's split changes when the task's version does)."""
        rows = [row.as_json() for row in self.config.rows()]
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()

    def state_width(self, in_features: int) -> int:
        return in_features + 1

    def fit_adapter(self, adapter: LoraAdapter, context: FitContext | None = None) -> dict[str, torch.Tensor]:
        raise ValidationFailed(
            "mixer trains one router for the whole composition: get its states through routers.token.states "
            "(or call fit_composition)",
            param="router",
        )

    def fit_composition(
        self, adapters: Sequence[LoraAdapter], context: FitContext | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """One state per adapter, trained together on the config's examples over the base in ``context``."""
        if context is None or context.base_dir is None:
            raise ValidationFailed("mixer needs the base model to train its router", param="experts")
        result = train_mixer(
            adapters,
            context.base_dir,
            self.config.rows(),
            self.config.training,
            init=self.config.init,
            on_step=context.on_step,
        )
        type(self).last_training = result
        return result.states

    def slot_params(self) -> dict[str, Any]:
        return {"kind": "mixer", "top_k": self.config.top_k}

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        return mixer_route(x, state, available, self.config.top_k, bias)
