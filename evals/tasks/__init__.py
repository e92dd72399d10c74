"""Synthetic skill tasks with seeded splits and exact-match graders, registered by name.

``TASKS`` is the registry every consumer (training recipe, eval harness, demo) reads.
"""

from __future__ import annotations

from evals.tasks.arithmetic import ArithmeticTask
from evals.tasks.base import SPLITS, Example, Split, Task, chat_messages, first_line, split_of
from evals.tasks.composite import ArithmeticSentimentTask, JsonDatesTask, JsonUnitsTask
from evals.tasks.dates import DatesTask
from evals.tasks.json_extract import JsonExtractTask
from evals.tasks.list_sort import ListSortTask
from evals.tasks.registry import TaskRegistry
from evals.tasks.sentiment import SentimentTask
from evals.tasks.units import UnitsTask

TASKS = TaskRegistry([ArithmeticTask(), DatesTask(), JsonExtractTask(), ListSortTask(), SentimentTask(), UnitsTask()])
# Held out: never trained on; evaluated only when asked for by name.
COMPOSITE_TASKS = TaskRegistry([ArithmeticSentimentTask(), JsonDatesTask(), JsonUnitsTask()])


def get_task(name: str) -> Task:
    """The task called ``name``, skill or composite (KeyError listing the known names otherwise)."""
    if name in COMPOSITE_TASKS:
        return COMPOSITE_TASKS.get(name)
    return TASKS.get(name)


def all_task_names() -> list[str]:
    return TASKS.names() + COMPOSITE_TASKS.names()


__all__ = [
    "COMPOSITE_TASKS",
    "SPLITS",
    "TASKS",
    "Example",
    "Split",
    "Task",
    "TaskRegistry",
    "all_task_names",
    "chat_messages",
    "first_line",
    "get_task",
    "split_of",
]
