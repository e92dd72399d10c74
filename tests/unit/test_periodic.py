"""core/periodic.py: a background step is stopped between steps, never cancelled inside one (a step cancelled
inside a database call stalled the app's shutdown, and CI, for good); only one past its grace is cancelled."""

from __future__ import annotations

import asyncio

from core.periodic import Periodic


async def test_stop_lets_the_step_in_progress_finish() -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def step() -> None:
        entered.set()
        await release.wait()  # as a database write in flight
        finished.append("step")

    writer = Periodic(step, 0.01, name="t", now=True).start()
    await entered.wait()
    stopping = asyncio.create_task(writer.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waiting for the step, not cancelling it
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert finished == ["step"]


async def test_steps_repeat_until_stopped_and_a_stuck_step_is_cancelled_past_its_grace() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)

    writer = Periodic(step, 0.01, name="t").start()
    await asyncio.sleep(0.1)
    await writer.stop()
    count = len(calls)
    assert count >= 3
    await asyncio.sleep(0.05)
    assert len(calls) == count  # nothing after stop

    cancelled: list[bool] = []

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    writer = Periodic(stuck, 0.01, name="stuck", now=True, grace_s=0.1).start()
    await asyncio.sleep(0.02)
    await asyncio.wait_for(writer.stop(), 5)
    assert cancelled == [True]
