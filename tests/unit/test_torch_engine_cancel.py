"""Work nobody waits for stops: a generation whose caller went away (task cancelled, stream closed) ends at
the end of the decoding step it is in, instead of running to max_tokens in the engine's worker thread.

Each test holds the worker thread inside a chosen decoding step (a forward pre-hook on the real model, the
``StepGate``), cancels the caller while it is held there, lets it go and counts the forward passes the
cancelled generation went on to make: none past the held step, where it would otherwise run to the
context's end (~500 steps). No timings: the gate makes the step of the cancellation exact."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.engine import FusedMember, Fusion, GenRequest, GenResult, Sampling, Target
from serving.torch_engine import TorchEngine

FORCED = Sampling(max_tokens=2000, ignore_eos=True)  # capped by the tiny models' 512 positions: ~500 steps
PAUSE = 4  # the decoding step during which the caller goes away
GATE_WAIT_S = 60  # only a guard against a hung test; nothing is measured in time


class StepGate:
    """Counts the model's forward passes (one per decoding step) and holds the worker thread at the start
    of forward ``pause_at`` until ``release``."""

    def __init__(self, model: torch.nn.Module, pause_at: int) -> None:
        self.steps = 0
        self.pause_at = pause_at
        self.reached = threading.Event()
        self._go = threading.Event()
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.steps += 1
        if self.steps == self.pause_at:
            self.reached.set()
            assert self._go.wait(GATE_WAIT_S), "the test never released the gate"

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, GATE_WAIT_S), "generation never reached the gate"

    def release(self) -> None:
        self._go.set()

    def remove(self) -> None:
        self._go.set()
        self._handle.remove()


@pytest.fixture
async def engine() -> Any:
    eng = TorchEngine()
    yield eng
    await eng.close()


def target(base: Path, adapter: Path | None = None) -> Target:
    if adapter is None:
        return Target(base_id="b", base_dir=base)
    return Target(base_id="b", base_dir=base, adapter_id=adapter.name, adapter_dir=adapter)


def ok(result: GenResult | BaseException) -> GenResult:
    assert isinstance(result, GenResult), result
    return result


async def gate_on(engine: TorchEngine, t: Target, pause_at: int = PAUSE) -> StepGate:
    await engine.load(t)
    model = engine._slot(t).model  # the real model the worker thread runs
    assert model is not None
    return StepGate(model, pause_at)


async def steps_until_idle(engine: TorchEngine, t: Target, gate: StepGate) -> int:
    """Forward passes made before the slot took its next request: a slot runs one batch at a time, so a short
    request sent now is answered only once the cancelled work has ended."""
    gate.release()
    nxt = ok((await engine.generate([GenRequest(t, Sampling(max_tokens=3, ignore_eos=True), prompt="next")]))[0])
    assert nxt.completion_tokens == 3  # the slot answers normally afterwards
    return gate.steps - nxt.completion_tokens  # one forward pass per generated token


async def test_a_cancelled_generation_stops_at_the_step_it_is_in(engine: TorchEngine, tiny_base: Path) -> None:
    t = target(tiny_base)
    gate = await gate_on(engine, t)
    task = asyncio.create_task(engine.generate([GenRequest(t, FORCED, prompt="hello")]))
    await gate.wait_reached()
    task.cancel()  # a client that hung up, or asyncio.timeout around the call
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await steps_until_idle(engine, t, gate) == PAUSE
    gate.remove()


async def test_a_cancelled_switching_generation_stops_too(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path
) -> None:
    """The adapter-switching baseline runs its batches in a thread of its own, not through the slot's queue."""
    t = target(tiny_base, tiny_lora)
    gate = await gate_on(engine, t)
    task = asyncio.create_task(engine.generate_switching([GenRequest(t, FORCED, prompt="hello")]))
    await gate.wait_reached()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await steps_until_idle(engine, t, gate) == PAUSE
    gate.remove()


async def test_a_cancelled_fused_generation_stops_every_member_row(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path
) -> None:
    """Logit fusion decodes one answer on one row per member; the member rows end with the caller's row."""
    base, lora = target(tiny_base), target(tiny_base, tiny_lora)
    gate = await gate_on(engine, lora)
    fusion = Fusion((FusedMember("base", base), FusedMember("lora", lora)))
    task = asyncio.create_task(engine.generate([GenRequest(base, FORCED, prompt="hello", fusion=fusion)]))
    await gate.wait_reached()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await steps_until_idle(engine, base, gate) == PAUSE
    gate.remove()


async def test_a_cancelled_row_no_longer_holds_its_shared_batch(engine: TorchEngine, tiny_base: Path) -> None:
    """Two callers in one batch: the one that goes away gets nothing more, the other its whole answer, and
    the batch ends with the remaining row (a row cannot leave a running batch, but it no longer extends it)."""
    t = target(tiny_base)
    gate = await gate_on(engine, t)
    short = Sampling(max_tokens=40, ignore_eos=True)
    leaving = asyncio.create_task(engine.generate([GenRequest(t, FORCED, prompt="hello")]))
    staying = asyncio.create_task(engine.generate([GenRequest(t, short, prompt="Solve 12 + 30")]))
    await gate.wait_reached()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    gate.release()
    answer = ok((await staying)[0])
    assert answer.completion_tokens == 40 and answer.extra["batch_size"] == 2  # it did share the batch
    assert await steps_until_idle(engine, t, gate) == 40
    gate.remove()


async def first_visible_step(engine: TorchEngine, t: Target) -> int:
    """The decoding step whose token first shows text in a stream of ``FORCED`` on "hello" (earlier tokens
    may decode to nothing), found with short non-streamed runs of the same greedy decoding."""
    for k in range(1, 64):
        result = ok(
            (await engine.generate([GenRequest(t, Sampling(max_tokens=k, ignore_eos=True), prompt="hello")]))[0]
        )
        if result.text.rstrip("\ufffd"):
            return k
    raise AssertionError("the tiny model shows no text in 63 tokens")


@pytest.mark.parametrize("how", ["aclose", "cancel_in_anext"])
async def test_a_stream_closed_early_stops(engine: TorchEngine, tiny_base: Path, how: str) -> None:
    t = target(tiny_base)
    pause = await first_visible_step(engine, t) + 1  # the first chunk is out before the worker is held
    gate = await gate_on(engine, t, pause)
    stream = engine.stream(GenRequest(t, FORCED, prompt="hello"))
    first = await anext(stream)
    assert first.text and first.finish_reason is None
    await gate.wait_reached()
    if how == "aclose":
        await stream.aclose()
    else:
        waiting = asyncio.create_task(anext(stream))  # nothing more comes while the worker is held
        for _ in range(3):  # let it start waiting inside the stream (a task cancelled unstarted never enters it)
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert await steps_until_idle(engine, t, gate) == pause
    gate.remove()
