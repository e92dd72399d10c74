"""Blocking file work (hashing, copying, unpacking gigabytes) off the event loop, without leaving debris.

A thread cannot be stopped. If the coroutine awaiting it is cancelled (client gone, server shutting down), the
cleanup that follows (remove the staging folder, drop new blobs) must not race the still-running thread, so
:func:`run_to_completion` lets the work finish, hands its result to ``on_cancel`` and only then re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_completion(fn: Callable[..., T], *args: Any, on_cancel: Callable[[T], None] | None = None) -> T:
    """``fn(*args)`` in a worker thread; on cancellation, wait for it, pass its result to ``on_cancel`` (if it
    succeeded), then raise CancelledError."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # a failed call cleans up after itself
            result = await work
            if on_cancel is not None:
                on_cancel(result)
        raise
