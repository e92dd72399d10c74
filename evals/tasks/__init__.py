"""Synthetic skill tasks with seeded splits and exact-match graders, registered by name.

``TASKS`` is the registry every consumer (training recipe, eval harness, demo) reads.
"""

from __future__ import annotations

from evals.tasks.arithmetic import ArithmeticTask
from evals.tasks.base import SPLITS, Example, Split, Task, chat_messages, first_line, split_of
from evals.tasks.dates import DatesTask
from evals.tasks.json_extract import JsonExtractTask
from evals.tasks.list_sort import ListSortTask
from evals.tasks.registry import TaskRegistry
from evals.tasks.sentiment import SentimentTask
from evals.tasks.units import UnitsTask

TASKS = TaskRegistry([ArithmeticTask(), DatesTask(), JsonExtractTask(), ListSortTask(), SentimentTask(), UnitsTask()])


def get_task(name: str) -> Task:
    """The registered task called ``name`` (KeyError listing the known names otherwise)."""
    return TASKS.get(name)


__all__ = [
    "SPLITS",
    "TASKS",
    "Example",
    "Split",
    "Task",
    "TaskRegistry",
    "chat_messages",
    "first_line",
    "get_task",
    "split_of",
]
