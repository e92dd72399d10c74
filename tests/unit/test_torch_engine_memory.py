"""The torch engine keeps what it has loaded under ``max_loaded_gib`` (MOERGE_TORCH_MAX_LOADED_GIB): past it,
the least recently used slots nobody is using are unloaded; a slot in use stays; an unloaded slot loads
again on its next request and answers as before. Three tiny random Llamas of one size are three slots; the
bound holds two and a half of them."""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from pathlib import Path
from typing import Any

import pytest

from serving.engine import GenRequest, GenResult, Sampling, Target
from serving.torch_engine import GIB, TorchEngine
from tests.unit.test_torch_engine_cancel import StepGate

GREEDY = Sampling(max_tokens=8)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.fixtures.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("lru")
    return [build_tiny_llama(root / f"base{i}", seed=i) for i in range(3)]


def targets(bases: list[Path]) -> list[Target]:
    return [Target(base_id=f"b{i}", base_dir=base) for i, base in enumerate(bases)]


@pytest.fixture(scope="module")
def slot_bytes(bases: list[Path]) -> int:
    """What one tiny base takes once loaded, as the engine's status reports it (the same for all three)."""

    async def measure() -> list[int]:
        probe = TorchEngine(max_loaded_gib=math.inf)
        try:
            for t in targets(bases):
                await probe.load(t)
            return [s["bytes"] for s in await probe.status()]
        finally:
            await probe.close()

    sizes = asyncio.run(measure())
    assert len(set(sizes)) == 1 and sizes[0] > 0, sizes
    return sizes[0]


@pytest.fixture
async def engine(slot_bytes: int) -> Any:
    eng = TorchEngine(max_loaded_gib=2.5 * slot_bytes / GIB)
    yield eng
    await eng.close()


async def answer(engine: TorchEngine, t: Target) -> str:
    result = (await engine.generate([GenRequest(t, GREEDY, prompt="hello")]))[0]
    assert isinstance(result, GenResult), result
    # The answer is delivered from inside the batch, just before its worker lets go of the slot; a slot
    # still held is skipped by the unloading, so wait for the worker (the slot's queue runner) to end.
    runner = engine._slot(t).runner
    if runner is not None:
        await runner
    return result.text


async def loaded(engine: TorchEngine) -> dict[str, bool]:
    return {s["name"]: s["state"] == "loaded" for s in await engine.status()}


async def test_the_least_recently_used_slot_is_unloaded_and_loads_again(
    engine: TorchEngine, bases: list[Path], slot_bytes: int
) -> None:
    a, b, c = targets(bases)
    first = await answer(engine, a)
    await answer(engine, b)
    model_a = weakref.ref(engine._slot(a).model)  # type: ignore[arg-type]
    assert await loaded(engine) == {"b0": True, "b1": True}

    await answer(engine, c)  # three do not fit: the oldest goes
    assert await loaded(engine) == {"b0": False, "b1": True, "b2": True}
    gc.collect()
    assert model_a() is None  # really let go, not just marked
    status = {s["name"]: s for s in await engine.status()}
    assert status["b0"]["bytes"] == 0 and status["b1"]["bytes"] == status["b2"]["bytes"] == slot_bytes

    await answer(engine, b)  # b is now more recent than c
    assert await answer(engine, a) == first  # loaded again, same answer
    assert await loaded(engine) == {"b0": True, "b1": True, "b2": False}  # c, least recently used, went


async def test_a_slot_in_use_is_never_unloaded(engine: TorchEngine, bases: list[Path]) -> None:
    a, b, c = targets(bases)
    await engine.load(a)
    model_a = engine._slot(a).model
    assert model_a is not None
    gate = StepGate(model_a, pause_at=2)  # hold a's generation inside its second step
    stream = engine.stream(GenRequest(a, Sampling(max_tokens=6, ignore_eos=True), prompt="hello"))
    reading = asyncio.create_task(anext(stream))
    try:
        await gate.wait_reached()
        await answer(engine, b)
        await answer(engine, c)  # over the bound: a is the oldest, but generating; b goes instead
        assert await loaded(engine) == {"b0": True, "b1": False, "b2": True}
        assert engine._slot(a).model is model_a
        assert {s["name"]: s["in_use"] for s in await engine.status()}["b0"]
    finally:
        gate.remove()
    chunks = [await reading] + [chunk async for chunk in stream]
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 6


async def test_one_slot_larger_than_the_bound_still_loads(bases: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    engine = TorchEngine(max_loaded_gib=0)
    try:
        a, b, _ = targets(bases)
        first = await answer(engine, a)
        assert "more than MOERGE_TORCH_MAX_LOADED_GIB" in caplog.text
        await answer(engine, b)
        assert await loaded(engine) == {"b0": False, "b1": True}  # only what is being served stays
        assert await answer(engine, a) == first
    finally:
        await engine.close()


def test_the_bound_must_be_a_size() -> None:
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="MOERGE_TORCH_MAX_LOADED_GIB"):
            TorchEngine(max_loaded_gib=bad)
