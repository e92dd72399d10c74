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

LIMIT_S = 0.5  # 500 forced tokens take about 1.4 s on the tiny model here; a first token a few ms
FORCED_TOKENS = 500
LONG = {"model": "tiny-base", "prompt": "hi", "max_tokens": FORCED_TOKENS, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[dict[str, Any]]:
    settings: Settings = dataclasses.replace(registry_env.settings, max_generation_s=LIMIT_S)
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    with serve(settings, TorchEngine()) as url:
        yield {"url": url, "headers": {"authorization": f"Bearer {registry_env.query_key}"}}


def test_a_generation_past_the_limit_ends_with_504(live: dict[str, Any]) -> None:
    url, headers = live["url"], live["headers"]
    short = {**LONG, "max_tokens": 1}

    def answers_short() -> httpx.Response:
        """A one-token request, tried until it fits in LIMIT_S (the first one loads the model)."""
        for _ in range(30):
            resp = httpx.post(f"{url}/v1/completions", headers=headers, json=short, timeout=60)
            if resp.status_code == 200:
                break
            time.sleep(0.1)
        return resp

    assert answers_short().status_code == 200

    # the engine is idle, so the stream starts within the limit (tried again if a busy machine delayed its first
    # token past it: that is a 504 before the stream begins), and is cut short inside
    for _ in range(5):
        with httpx.stream(
            "POST", f"{url}/v1/completions", headers=headers, json={**LONG, "stream": True}, timeout=60
        ) as s:
            events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
            if s.status_code == 200:
                break
            assert s.status_code == 504
    assert s.status_code == 200
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "generation_timeout"
    assert len(events) - 2 < FORCED_TOKENS  # cut short, not run to the end

    assert answers_short().status_code == 200  # the engine is idle again

    resp = httpx.post(f"{url}/v1/completions", headers=headers, json=LONG, timeout=60)
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["code"] == "generation_timeout" and "MOERGE_MAX_GENERATION_S" in error["message"]

    # the engine is free again: a short request answers (within a few tries: the stopped generations end at
    # their next decode step, and the short one has LIMIT_S too)
    again = answers_short()
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 1


@pytest.fixture
def torch_live(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[dict[str, Any]]:
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    engine = TorchEngine()
    with serve(registry_env.settings, engine) as url:
        yield {"url": url, "engine": engine, "headers": {"authorization": f"Bearer {registry_env.query_key}"}}


def test_a_client_that_hangs_up_stops_its_generation(torch_live: dict[str, Any]) -> None:
    """The worker is held inside decoding step 4 while the client gives up; once released, the generation ends
    at that step instead of running its 500 tokens (counted as the model's forward passes, not timed)."""
    url, headers, engine = torch_live["url"], torch_live["headers"], torch_live["engine"]
    short = {**LONG, "max_tokens": 3}
    assert httpx.post(f"{url}/v1/completions", headers=headers, json=short, timeout=60).status_code == 200
    (slot,) = engine._slots.values()  # the model the engine's worker thread runs
    steps, reached, go = [0], threading.Event(), threading.Event()

    def hold_at_step_4(module: Any, args: Any) -> None:
        steps[0] += 1
        if steps[0] == 4:
            reached.set()
            go.wait(60)

    handle = slot.model.register_forward_pre_hook(hold_at_step_4)
    try:
        with ThreadPoolExecutor(1) as pool:
            hung = pool.submit(httpx.post, f"{url}/v1/completions", headers=headers, json=LONG, timeout=0.5)
            assert reached.wait(60)
            with pytest.raises(httpx.TimeoutException):
                hung.result()
        time.sleep(0.5)  # the server notices the closed connection and cancels the request
        go.set()
        after = httpx.post(f"{url}/v1/completions", headers=headers, json=short, timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        # the hung-up generation stopped at the step it was in; the short one took 3 more
        assert steps[0] - 3 < 10, f"{steps[0] - 3} decoding steps: the generation ran on after its client left"
    finally:
        go.set()
        handle.remove()
