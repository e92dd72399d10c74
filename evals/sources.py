"""The demo's tasks for the product, which never imports evals: each task as a named example source for the
routers (``routers/examples.py``: ``mixer`` given ``task`` trains on that task's seeded train split), and the
demo's training recipe ``demo-lora`` for `train` jobs (``jobs/train.py``). api calls ``install_example_sources``
where the app, the CLI and the worker start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ValidationFailed
from evals.tasks import Task, all_task_names, get_task
from jobs.train import StepFn, Trained, register_recipe
from registry.training_data import TrainingRow
from routers.examples import ExampleSource, register_example_source


def train_split(task: Task) -> ExampleSource:
    """``n`` -> the first ``n`` examples of ``task``'s train split as chat rows."""

    def rows(n: int) -> list[TrainingRow]:
        return [TrainingRow.from_prompt(e.prompt, e.answer) for e in task.examples("train", n)]

    return rows


class DemoRecipe:
    """``demo-lora``: one of the demo's experts (``params: {"task": name}``), trained by the demo's recipe
    (``evals/recipe.py``) into the machine's cache, or taken from it when that recipe already trained it."""

    def check(self, params: dict[str, Any]) -> None:
        task = params.get("task")
        if set(params) != {"task"} or not isinstance(task, str) or task not in all_task_names():
            raise ValidationFailed(
                f"params.task: one of {', '.join(all_task_names())} (and nothing else), got {task!r}",
                param="params.task",
            )

    def train(self, params: dict[str, Any], base_dir: Path, work_dir: Path, on_step: StepFn) -> Trained:
        from evals.recipe import LoraRecipe, train_expert

        task = get_task(params["task"])
        folder = train_expert(task, base_dir, on_step=on_step)
        return Trained(folder, train_split(task)(LoraRecipe().train_examples))


def install_example_sources() -> None:
    """Register every task, skills and held-out composites, under its name, and the demo's recipe (again: the
    same ones)."""
    for name in all_task_names():
        register_example_source(name, train_split(get_task(name)))
    register_recipe("demo-lora", DemoRecipe())
