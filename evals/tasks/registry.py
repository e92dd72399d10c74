"""A name -> task registry; every task is validated on the way in and names are unique."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from evals.tasks.base import Task, validate_task


class TaskRegistry:
    """Tasks by name, in registration order."""

    def __init__(self, tasks: Iterable[Task] = ()) -> None:
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            self.register(task)

    def register(self, task: Task) -> Task:
        """Validate and add ``task``; a second task under a taken name is refused."""
        validate_task(task)
        if task.name in self._tasks:
            raise ValueError(f"task name {task.name!r} is already registered")
        self._tasks[task.name] = task
        return task

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; known: {', '.join(self._tasks)}") from None

    def names(self) -> list[str]:
        return list(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks
