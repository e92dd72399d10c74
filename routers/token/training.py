"""What the token routers that train (``phatgoose``'s gates, ``mixer``'s router) share: the training config,
encoding the examples, loading the frozen base, putting training layers in place of its LoRA target linears,
and the optimizer loop on the answer-token loss (the demo recipe's ``evals.recipe.encode_chat`` and
``answer_loss``).

Only the small router parameters are trained; the base and the adapters stay frozen, so every step still runs
a backward through the base (no weight gradients). CPU heavy: callers run it off the event loop.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ValidationFailed
from registry.training_data import TrainingRow
from routers.query.base import RouterConfig, require
from serving.mixture.adapters import refused, target_linear

Encoded = list[tuple[list[int], list[int]]]  # (ids, labels) rows, labels scoring the answer only


class GateTrainingConfig(RouterConfig, frozen=True):
    """How a router's parameters are trained; every field changes the stored state (it is hashed into its key).

    steps: optimizer steps (1..10000; PHATGOOSE trains about 100).
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


def load_tokenizer(base_dir: Path | str) -> tuple[Any, int]:
    """The base's tokenizer and the id it pads with."""
    from transformers import AutoTokenizer  # heavy: importing the router registry must not load transformers

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, int(pad_id)


def encode_rows(
    tokenizer: Any, examples: Sequence[TrainingRow], config: GateTrainingConfig, owner: str
) -> tuple[Encoded, int]:
    """Rows drawn in a seeded order, encoded only as far as the steps use them (steps x batch_size at most),
    skipping those longer than max_length; returns them and how many were skipped. ``owner`` names whose
    examples these are in the error raised when none fits."""
    from routers.token.encoding import encode_chat

    rng = random.Random(config.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    wanted = config.steps * config.batch_size
    data: Encoded = []
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
            f"{owner}: none of its {len(examples)} training examples fits in max_length={config.max_length} tokens",
            param="router_params.training.max_length",
        )
    return data, skipped


def frozen_base(base_dir: Path | str) -> nn.Module:
    """The base causal LM in float32, frozen and in eval mode (no dropout: the router sees the activations
    routing will see)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model


def replace_linears(
    model: nn.Module,
    modules: Iterable[str],
    owner: Callable[[str], str],
    shape: Callable[[str], tuple[int, int]],
    make: Callable[[str, nn.Linear], nn.Module],
) -> dict[str, nn.Module]:
    """Put ``make(module, base_linear)`` in place of each named linear of ``model``; ``owner(module)`` names
    the adapter blamed when the module is not a Linear of the base or its (in, out) differs from
    ``shape(module)``. Returns the new layers by module path."""
    placed: dict[str, nn.Module] = {}
    for module in modules:
        layer = target_linear(model, module, owner(module))
        if (layer.in_features, layer.out_features) != shape(module):
            raise refused(owner(module), f"module {module} does not fit the base layer's shape")
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        placed[module] = make(module, layer)
        setattr(parent, leaf, placed[module])
    return placed


def run_steps(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    data: Encoded,
    config: GateTrainingConfig,
    pad_id: int,
    what: str,
    on_step: Callable[[int, int, float], None] | None = None,
    param_groups: Sequence[dict[str, Any]] | None = None,
) -> list[float]:
    """``config.steps`` Adam steps on ``params`` (or on ``param_groups``, for per-group learning rates) of
    the answer-token loss over batches cycling through ``data``; returns the loss of every step. ``what``
    names the training in the error raised if the loss diverges."""
    from routers.token.encoding import answer_loss

    optimizer = torch.optim.Adam(list(param_groups) if param_groups else list(params), lr=config.lr)
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
            raise RuntimeError(f"{what} diverged at step {step} (loss {losses[-1]})")
        if on_step is not None:
            on_step(step, config.steps, losses[-1])
    return losses


@dataclass
class TrainedLayers:
    layers: dict[str, nn.Module]  # the training layers put in place of the base's linears, by module path
    losses: list[float]  # answer-token loss per step
    examples: int  # rows used (those within max_length)
    skipped: int  # rows longer than max_length
    seconds: float


def train_layers(
    base_dir: Path | str,
    examples: Sequence[TrainingRow],
    config: GateTrainingConfig,
    owner: str,
    modules: Iterable[str],
    blame: Callable[[str], str],
    shape: Callable[[str], tuple[int, int]],
    make: Callable[[str, nn.Linear], nn.Module],
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainedLayers:
    """The whole training of a router: encode ``examples``, load the frozen base, put ``make``'s layers in place
    of ``modules`` (``replace_linears``: ``blame`` and ``shape``) and train their own parameters (those that
    require a gradient) for ``config.steps``. ``owner`` names whose router it is in errors."""
    started = time.perf_counter()
    tokenizer, pad_id = load_tokenizer(base_dir)
    data, skipped = encode_rows(tokenizer, examples, config, owner)
    model = frozen_base(base_dir)
    layers = replace_linears(model, modules, blame, shape, make)
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    losses = run_steps(model, params, data, config, pad_id, f"router training of {owner}", on_step)
    return TrainedLayers(layers, losses, len(data), skipped, time.perf_counter() - started)
