"""The demo experts' training recipe: one rank-8 LoRA per skill task, trained on CPU in float32.

Experts are cached under ``<out_root>/<task>-<digest[:12]>``; the digest covers the recipe, the task's
name, generator version and a sample of its output, the base model and this trainer's version, so
changing any of them trains a new expert and an unchanged recipe reuses the old one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.tasks import Example, Task, chat_messages
from jobs.lora_sft import SftRecipe, StepCallback, train_lora
from registry.convert import cache_dir
from registry.training_data import TrainingRow
from routers.token.encoding import encode_chat

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
RECIPE_FILE = "recipe.json"
# Bump when the training loop changes what it produces for the same recipe: every expert retrains.
TRAINER_VERSION = 1


@dataclass(frozen=True)
class LoraRecipe(SftRecipe):
    """The demo's recipe: ``SftRecipe``'s fields, all of which go into the digest that names the cached expert."""

    def digest(self, task: Task, base_dir: Path) -> str:
        """sha256 over the recipe, the task (name + generator version), the base model and the trainer."""
        payload = {
            "recipe": self.as_dict(),
            "task": task.name,
            "task_version": task.version,
            "task_sample": task_fingerprint(task),
            "base": base_manifest(base_dir),
            "trainer_version": TRAINER_VERSION,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def task_fingerprint(task: Task) -> str:
    """sha256 of a few generated train examples: a generator edited without a version bump still
    changes the digest, so a stale expert is never reused."""
    sample = [[ex.prompt, ex.answer] for ex in task.examples("train", 16)]
    return hashlib.sha256(json.dumps(sample).encode()).hexdigest()


def base_manifest(base_dir: Path) -> dict[str, str]:
    """A cheap fingerprint of a base model folder: small files hashed whole, weight files by size and
    safetensors header (tensor names, shapes, dtypes, offsets), so no 500 MB read per digest."""
    base_dir = Path(base_dir)
    manifest: dict[str, str] = {}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        path = base_dir / name
        if path.is_file():
            manifest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = sorted(base_dir.glob("*.safetensors"))
    if "config.json" not in manifest or not weights:
        raise FileNotFoundError(f"{base_dir} is not a model folder (needs config.json and *.safetensors)")
    for path in weights:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = f.read(header_len)
        manifest[path.name] = f"{path.stat().st_size}:{hashlib.sha256(header).hexdigest()}"
    return manifest


def expert_dir(task: Task, base_dir: Path, out_root: Path | None = None, recipe: LoraRecipe | None = None) -> Path:
    """Where ``train_expert`` keeps (or will keep) this task's expert."""
    recipe = recipe or LoraRecipe()
    root = Path(out_root) if out_root is not None else default_out_root()
    return root / f"{task.name}-{recipe.digest(task, base_dir)[:12]}"


def default_out_root() -> Path:
    return cache_dir() / "experts"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "adapter_config.json").is_file()


def train_expert(
    task: Task,
    base_dir: Path,
    out_root: Path | None = None,
    recipe: LoraRecipe | None = None,
    *,
    num_threads: int = 2,
    on_step: StepCallback | None = None,
) -> Path:
    """Train (or reuse) the LoRA expert for ``task`` on ``base_dir``; returns its folder.

    The folder appears complete or not at all: training writes into a temporary sibling that is
    renamed into place once the adapter, card, ``recipe.json`` and finally ``.complete`` are written.
    """
    recipe = recipe or LoraRecipe()
    base_dir = Path(base_dir)
    digest = recipe.digest(task, base_dir)
    root = Path(out_root) if out_root is not None else default_out_root()
    dest = root / f"{task.name}-{digest[:12]}"
    if is_complete(dest):
        logger.info("reusing expert %s", dest)
        return dest

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        started = time.perf_counter()
        losses = _train(task, base_dir, tmp, recipe, num_threads=num_threads, on_step=on_step)
        seconds = time.perf_counter() - started
        info = {
            "task": task.name,
            "task_version": task.version,
            "recipe": recipe.as_dict(),
            "digest": digest,
            "trainer_version": TRAINER_VERSION,
            "base_dir": str(base_dir),
            "base_manifest": base_manifest(base_dir),
            # Mean of the last few steps: a single batch's loss is noisy.
            "final_train_loss": sum(losses[-5:]) / len(losses[-5:]),
            "losses": [round(x, 5) for x in losses],
            "train_seconds": round(seconds, 1),
            "num_threads": num_threads,
        }
        (tmp / RECIPE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(task, base_dir, recipe, info))
        (tmp / COMPLETE_MARKER).write_text(f"{digest}\n")
        _move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _move_into_place(tmp: Path, dest: Path) -> None:
    if dest.exists():
        if is_complete(dest):
            return  # a concurrent trainer finished the same digest first; its copy is equivalent
        shutil.rmtree(dest)  # a stale, incomplete folder from an older layout or a crash
    try:
        os.replace(tmp, dest)
    except OSError:
        if not is_complete(dest):
            raise


# -- training ----------------------------------------------------------------------------------------


def _encode(tokenizer: Any, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted example and labels that score only the answer turn (as ``train_lora``
    encodes each row)."""
    return encode_chat(tokenizer, chat_messages(ex.prompt), ex.answer, max_length)


def _train(
    task: Task,
    base_dir: Path,
    out: Path,
    recipe: LoraRecipe,
    *,
    num_threads: int,
    on_step: StepCallback | None,
) -> list[float]:
    rows = [TrainingRow.from_prompt(ex.prompt, ex.answer) for ex in task.examples("train", recipe.train_examples)]
    return train_lora(rows, base_dir, out, recipe, name=task.name, num_threads=num_threads, on_step=on_step)


# -- model card ----------------------------------------------------------------------------------------


def _base_model_id(base_dir: Path) -> str:
    """The hub id the base's own card names as its origin, else the folder name."""
    card = base_dir / "README.md"
    if card.is_file():
        lines = card.read_text().splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                if line.startswith("base_model:") and line.split(":", 1)[1].strip():
                    return line.split(":", 1)[1].strip()
    return base_dir.name


def _model_card(task: Task, base_dir: Path, recipe: LoraRecipe, info: dict[str, Any]) -> str:
    base_id = _base_model_id(base_dir)
    tags = ["moerge", "lora", "peft", f"task:{task.name}", *(s.replace(" ", "-").lower() for s in task.skills)]
    front = [
        "---",
        f"base_model: {json.dumps(base_id)}",
        "library_name: peft",
        "license: apache-2.0",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {json.dumps(t)}" for t in tags),
        f"task: {task.name}",
        f"description: {json.dumps(task.description)}",
        "skills:",
        *(f"- {json.dumps(s)}" for s in task.skills),
        "domains:",
        *(f"- {json.dumps(d)}" for d in task.domains),
        "example_prompts:",
        *(f"- {json.dumps(p)}" for p in task.example_prompts),
        "---",
    ]
    recipe_rows = "\n".join(f"| {k} | {v} |" for k, v in recipe.as_dict().items())
    body = f"""
# {task.name} expert (LoRA of {base_id})

{task.description}

A moerge demo expert: a rank-{recipe.rank} LoRA on {", ".join(recipe.target_modules)}, trained for
{recipe.steps} steps on {recipe.train_examples} synthetic `{task.name}` examples (task generator
version {task.version}) in float32 on CPU, loss on the answer turn only. Train loss at the end:
{info["final_train_loss"]:.4f}; training took {info["train_seconds"]:.0f} s.

Example prompt: {task.example_prompts[0]!r}

## Recipe (digest `{info["digest"][:12]}`)

| field | value |
| --- | --- |
{recipe_rows}

Produced by `moerge` (`evals/recipe.py`).
"""
    return "\n".join(front) + "\n" + body
