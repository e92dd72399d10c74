"""A background step repeated every few seconds that is stopped between steps, never cancelled inside one.

Cancelling a task while it awaits a database call can leave it waiting forever: seen in CI with SQLAlchemy's
asyncio layer over aiosqlite, where the app's shutdown cancelled the per-minute rollups' writer mid-flush and
the task stayed "cancelling" on a future nothing would complete (the whole test run stalled past CI's limit).
So ``stop`` asks the loop to end and waits for the step in progress to finish; only a step that outlasts
``grace_s`` is cancelled, as a last resort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Run ``step`` every ``every_s`` seconds in a task (first after ``every_s``, or at once with ``now``)."""

    def __init__(
        self, step: Callable[[], Awaitable[None]], every_s: float, *, name: str, now: bool = False, grace_s: float = 30
    ) -> None:
        self.step, self.every_s, self.name, self.now, self.grace_s = step, every_s, name, now, grace_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Periodic:
        self._task = asyncio.create_task(self._loop(), name=self.name)
        return self

    async def _loop(self) -> None:
        if not self.now and await self._stopped_within(self.every_s):
            return
        while True:
            await self.step()
            if await self._stopped_within(self.every_s):
                return

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def stop(self) -> None:
        """End the loop after the step in progress (cancelled only past ``grace_s``)."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=self.grace_s)
        if not done:
            log.warning("%s: a step outlasted %.0f s at shutdown; cancelled", self.name, self.grace_s)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self.grace_s)
            if not done:  # a cancellation that never lands: left behind rather than hanging the shutdown
                log.error("%s: still running after its cancellation; left behind", self.name)
                return
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
