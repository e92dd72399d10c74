"""Every generation has a time limit (MOERGE_MAX_GENERATION_S): past it the request ends with a 504 (inside the
stream once it has begun), and the server goes on answering. Torch engine on a tiny model, through uvicorn."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve

LIMIT_S = 0.5  # a one-token request answers well within it; a held generation cannot
FORCED_TOKENS = 500
LONG = {"model": "tiny-base", "prompt": "hi", "max_tokens": FORCED_TOKENS, "ignore_eos": True, "temperature": 0}
HOLD_AT_STEP = 4


class StepGate:
    """Holds the engine's worker thread at the start of decoding step ``HOLD_AT_STEP`` until ``release``, and
    counts the steps (forward passes): what happens while a generation runs is then decided by the test, not by
    the machine's speed."""

    def __init__(self, engine: TorchEngine) -> None:
        (slot,) = engine._slots.values()  # the model the engine's worker thread runs
        assert slot.model is not None
        self.steps = 0
        self.reached, self._go = threading.Event(), threading.Event()
        self._handle = slot.model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.steps += 1
        if self.steps == HOLD_AT_STEP:
            self.reached.set()
            self._go.wait(60)

    def release(self) -> None:
        """Let the held step go on; steps are still counted until ``stop``."""
        self._go.set()

    def stop(self) -> None:
        self._go.set()
        self._handle.remove()


def _serve(settings: Settings, tiny_base: Path, query_key: str) -> Iterator[dict[str, Any]]:
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    engine = TorchEngine()
    with serve(settings, engine) as url:
        headers = {"authorization": f"Bearer {query_key}"}
        # loaded before any limit matters (a first request loads the model)
        for _ in range(30):
            if httpx.post(f"{url}/v1/completions", headers=headers, json={**LONG, "max_tokens": 1}).status_code == 200:
                break
            time.sleep(0.2)
        yield {"url": url, "engine": engine, "headers": headers}


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[dict[str, Any]]:
    settings: Settings = dataclasses.replace(registry_env.settings, max_generation_s=LIMIT_S)
    yield from _serve(settings, tiny_base, registry_env.query_key)


def test_a_generation_past_the_limit_ends_with_504(live: dict[str, Any]) -> None:
    url, headers, engine = live["url"], live["headers"], live["engine"]

    # held inside step 4 past the limit: the stream has begun (its first tokens came), and ends with the error
    gate = StepGate(engine)
    try:
        with httpx.stream(
            "POST", f"{url}/v1/completions", headers=headers, json={**LONG, "stream": True}, timeout=60
        ) as s:
            assert s.status_code == 200
            events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    finally:
        gate.stop()
    assert gate.reached.is_set() and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "generation_timeout"

    gate = StepGate(engine)
    try:
        resp = httpx.post(f"{url}/v1/completions", headers=headers, json=LONG, timeout=60)
    finally:
        gate.stop()
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["code"] == "generation_timeout" and "MOERGE_MAX_GENERATION_S" in error["message"]

    # the stopped generations end at their next step: a short request answers (tried a few times, since it has
    # LIMIT_S too and may wait for the step in progress)
    gate = StepGate(engine)  # counting only: the short request takes 1 step, never reaching step 4
    for _ in range(30):
        again = httpx.post(f"{url}/v1/completions", headers=headers, json={**LONG, "max_tokens": 1}, timeout=60)
        if again.status_code == 200:
            break
        time.sleep(0.1)
    gate.stop()
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 1
    assert gate.steps < 30  # the held generations did not run on to their 500 tokens


@pytest.fixture
def torch_live(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[dict[str, Any]]:
    yield from _serve(registry_env.settings, tiny_base, registry_env.query_key)


def test_a_client_that_hangs_up_stops_its_generation(torch_live: dict[str, Any]) -> None:
    """The worker is held inside decoding step 4 while the client gives up; once released, the generation ends
    at that step instead of running its 500 tokens (counted as the model's forward passes, not timed)."""
    url, headers, engine = torch_live["url"], torch_live["headers"], torch_live["engine"]
    gate = StepGate(engine)
    try:
        with ThreadPoolExecutor(1) as pool:
            hung = pool.submit(httpx.post, f"{url}/v1/completions", headers=headers, json=LONG, timeout=0.5)
            assert gate.reached.wait(60)
            with pytest.raises(httpx.TimeoutException):
                hung.result()
        time.sleep(0.5)  # the server notices the closed connection and cancels the request
        gate.release()
        short = {**LONG, "max_tokens": 3}
        after = httpx.post(f"{url}/v1/completions", headers=headers, json=short, timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
    finally:
        gate.stop()
    # the hung-up generation stopped at the step it was in (the short request, answered after it, took 3 more):
    # it would have gone on for ~500 steps
    assert gate.steps - 3 < 10, f"{gate.steps - 3} decoding steps: the generation ran on after its client left"
