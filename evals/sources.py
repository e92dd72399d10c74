"""The demo's tasks as named example sources for the product's routers (``routers/examples.py``): ``mixer``
given ``task`` trains on that task's seeded train split. api calls ``install_example_sources`` where the app
and the CLI start; the product itself never imports evals."""

from __future__ import annotations

from evals.tasks import Task, all_task_names, get_task
from registry.training_data import TrainingRow
from routers.examples import ExampleSource, register_example_source


def train_split(task: Task) -> ExampleSource:
    """``n`` -> the first ``n`` examples of ``task``'s train split as chat rows."""

    def rows(n: int) -> list[TrainingRow]:
        return [TrainingRow.from_prompt(e.prompt, e.answer) for e in task.examples("train", n)]

    return rows


def install_example_sources() -> None:
    """Register every task, skills and held-out composites, under its name (again: the same sources)."""
    for name in all_task_names():
        register_example_source(name, train_split(get_task(name)))
