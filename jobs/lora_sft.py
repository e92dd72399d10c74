"""Supervised fine-tuning of one LoRA adapter on chat examples, on CPU in float32: the `lora-sft` recipe of
`train` jobs (``jobs/train.py``) and of the demo's experts (``evals/recipe.py`` trains them with it).

Each step: a batch of seeded-shuffled examples, the loss on the answer tokens only (``routers/token/encoding``),
AdamW with linear warm-up then cosine decay to 10% of the peak, gradients clipped at 1.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.training_data import TrainingRow
from routers.token.encoding import answer_loss, encode_chat

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

StepCallback = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass(frozen=True)
class SftRecipe:
    """Everything that decides what a trained LoRA expert is (the demo's recipe digests all of it)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    learning_rate: float = 2e-3
    warmup_steps: int = 5
    # 90 steps of 16, each example seen once: arithmetic (its subtraction) reached 89% after 60 steps
    # and 97% after 90; the other tasks were at 89-100% after 60.
    steps: int = 90
    batch_size: int = 16
    max_length: int = 192  # tokens per example, prompt + answer; longer ones are refused, not cut
    train_examples: int = 1440
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("rank", "alpha", "steps", "batch_size", "max_length", "train_examples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"SftRecipe.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SftRecipe.dropout must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0:
            raise ValueError(f"SftRecipe.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("SftRecipe.warmup_steps must be in [0, steps)")
        if not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("SftRecipe.target_modules must be non-empty and without repeats")

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


def train_lora(
    rows: Sequence[TrainingRow],
    base_dir: Path,
    out: Path,
    recipe: SftRecipe,
    *,
    name: str = "expert",
    num_threads: int = 2,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train a LoRA adapter of ``base_dir`` on ``rows`` (the answer tokens' loss) and save it (PEFT,
    safetensors) into ``out``; returns each step's loss. ``on_step(step, steps, loss)`` after every step
    (raising from it stops the training). ``name`` names the expert in errors."""
    # Heavy imports stay local so importing this module does not pull in torch.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        data = [encode_chat(tokenizer, row.messages, row.answer, recipe.max_length) for row in rows]

        # fork_rng: seeding for LoRA init must not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            lora = LoraConfig(
                r=recipe.rank,
                lora_alpha=recipe.alpha,
                lora_dropout=recipe.dropout,
                target_modules=list(recipe.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)  # type: ignore[assignment]
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(recipe))
            order = _batches(len(data), recipe)
            losses: list[float] = []
            for step, idx in enumerate(order, start=1):
                loss = answer_loss(model, [data[i] for i in idx], pad_id)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if on_step is not None:
                    on_step(step, recipe.steps, losses[-1])
                if not math.isfinite(losses[-1]):
                    raise RuntimeError(f"training {name!r} diverged at step {step} (loss {losses[-1]})")
        model.save_pretrained(str(out), safe_serialization=True)
        return losses
    finally:
        torch.set_num_threads(threads_before)


def _lr_schedule(recipe: SftRecipe) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / (recipe.warmup_steps + 1)
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(n: int, recipe: SftRecipe) -> list[list[int]]:
    """Indices of each step's batch: seeded shuffles of the train set, one epoch after another."""
    rng = random.Random(recipe.seed)
    pool: list[int] = []
    out: list[list[int]] = []
    for _ in range(recipe.steps):
        batch: list[int] = []
        while len(batch) < recipe.batch_size:
            if not pool:
                pool = list(range(n))
                rng.shuffle(pool)
            batch.append(pool.pop())
        out.append(batch)
    return out
