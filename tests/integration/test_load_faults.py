"""Load and faults, the CI versions of bench/load.py (issue 21, item 3): 8 clients for 20 s through
`moerge serve --no-worker` (a real subprocess: uvicorn, the vLLM engine, one managed vLLM server) beside a
`moerge worker`, over a tiny random Llama and four LoRAs of it: the plain adapters, `auto` (embedding, k=1),
`pair` (embedding, k=2, vote) and `mix` (arrow, token-level, one adapter slot in vLLM), half the clients
streamed.

(a) zero errors and every answer well-formed; (b) the vLLM API process SIGKILLed under the load: only the
requests in flight fail (502/503 or an error event, within 5 s), requests sent while it restarts get 503 with
Retry-After at once, nothing hangs, answers resume, the token-level model answers throughout, and no process
of the killed group outlives it; (c) the worker running a merge SIGKILLed mid-merge under the load: the job
ends failed with a clear error once a new worker finds its lease lapsed, nothing registered or left behind,
`moerge expert verify` clean, the same merge then runs to success, and the load sees no error.

Timing targets belong to bench/load.py; these assert behaviour only. One module-scoped stack: one vLLM start
shared by the three tests (run in this order; (b) restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.load import (
    TOPICS,
    Call,
    Kill,
    MergeOutcome,
    Stack,
    analyze_kill,
    create_compositions,
    errors_of,
    import_expert,
    kill_under_load,
    load_for,
    merge_leftovers,
    merge_under_load,
    misnamed_streams,
    moerge_env,
    register_topics,
    standard_kinds,
    still_running,
    warm_up,
)
from tests.fixtures.vllm_models import build_vllm_tiny_llama, build_vllm_tiny_lora

pytestmark = pytest.mark.vllm

CLIENTS = 8
SECONDS = 20
MAX_TOKENS = 8
TIMEOUT_S = 120  # each request's client timeout; every request must end well before it
STALE_S = 3  # a worker's lease lapses this long after its last heartbeat


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from registry.convert import cache_dir

    root = tmp_path_factory.mktemp("load-faults")
    base = build_vllm_tiny_llama(root / "base")
    adapters = [build_vllm_tiny_lora(base, root / f"lora-{i}", seed=30 + i) for i in range(len(TOPICS))]
    home = root / "home"
    env = moerge_env(
        home,
        [root, cache_dir()],  # the cache: SmolLM2's converted folder, imported by the merge test
        MOERGE_MERGE_STALE_S=str(STALE_S),
        MOERGE_STORE_ORPHAN_AGE_S="0",  # the store has one writer at a time here: a new worker sweeps at once
        MOERGE_VLLM_MAX_MODEL_LEN="512",
        MOERGE_VLLM_KV_CACHE_GIB="1",
    )
    stack = Stack(home, env, "load-faults-admin-key-0123456789")
    try:
        stack.init()
        stack.start_server()
        stack.start_worker()
        slugs = register_topics(stack, base, adapters)
        create_compositions(stack, slugs)
        warm_up(stack, standard_kinds(slugs), timeout_s=600)  # starts vLLM, loads every adapter and the mixture
        yield stack
    finally:
        stack.stop()


def _kinds() -> list[Any]:
    return standard_kinds([t.slug for t in TOPICS])


def _load(stack: Stack, during: Any = None) -> tuple[list[Call], Any, float]:
    return asyncio.run(
        load_for(
            stack.url,
            stack.headers,
            _kinds(),
            clients=CLIENTS,
            seconds=SECONDS,
            during=during,
            max_tokens=MAX_TOKENS,
            timeout_s=TIMEOUT_S,
        )
    )


def _each_kind_answered(calls: list[Call], since: float = 0.0) -> None:
    for kind in _kinds():
        answered = [c for c in calls if c.kind == kind.name and c.ok and c.start >= since]
        assert {c.stream for c in answered} == {False, True}, (kind.name, len(answered))  # streamed and not


def test_load_has_no_errors_and_every_answer_is_well_formed(stack: Stack) -> None:
    calls, _, _ = _load(stack)
    # each call checked its answer: status, shape, model name, role, finish_reason, usage; a stream's events and
    # [DONE] (the model its events name: below)
    assert errors_of(calls) == []
    assert len(calls) > 2 * CLIENTS
    _each_kind_answered(calls)
    assert all(c.tokens == MAX_TOKENS for c in calls if c.kind == "adapters")  # ignore_eos: exactly max_tokens
    assert max(c.latency_s for c in calls) < TIMEOUT_S / 2
    misnamed = misnamed_streams(calls)
    assert misnamed == []  # every event of a stream names the model asked for


def test_a_killed_vllm_server_fails_only_the_requests_in_flight(stack: Stack) -> None:
    before = stack.vllm_server()

    async def kill(stop: asyncio.Event) -> Kill:
        return await kill_under_load(stack, stop, after_s=SECONDS / 4, restart_timeout_s=300)

    calls, killed, _ = _load(stack, kill)
    try:
        report = analyze_kill(calls, killed.at)
        assert report.problems == [], (report, errors_of(calls))
        assert report.in_flight_failed >= 1, report  # the kill hit requests in flight: they failed, fast
        assert report.fail_after_kill_max_s <= 5
        assert max(c.latency_s for c in calls) < TIMEOUT_S / 2  # nothing hung
        _each_kind_answered(calls, since=killed.at + report.resumed_after_s)  # every kind answers again
        after = stack.vllm_server()
        assert after["state"] == "ready" and after["restarts"] == before["restarts"] + 1
        assert after["pid"] != killed.pid

        # the engine core and its worker, orphaned by the kill, die with it (moerge kills the server's group)
        assert any("EngineCore" in line for line in killed.group.values()), killed.group  # children to orphan
        deadline = time.monotonic() + 10
        while (left := still_running(killed.group)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == {}
    finally:
        for pid in still_running(killed.group):  # never leave an orphaned engine core running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_worker_killed_mid_merge_under_load(stack: Stack, smollm2_dir: Path) -> None:
    """The merge is of two rank-8 LoRAs of SmolLM2 into a rank-8 LoRA (an SVD per module: seconds here, long
    enough to kill mid-way; the tiny served adapters merge in milliseconds). Only registered, never served."""
    from bench.serving_multi_lora import make_adapters

    loras = make_adapters(smollm2_dir, stack.home.parent / "smol-loras", 2)
    import_expert(stack, smollm2_dir, "smollm2")
    for i, folder in enumerate(loras):
        import_expert(stack, folder, f"smol-lora-{i}", base="smollm2")
    config = {
        "merge_method": "ties",
        "base_model": "smollm2",
        "models": [{"model": f"smol-lora-{i}", "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)],
        "output": {"format": "lora", "rank": 8},
        "name": "smol-ties",
    }

    async def merge(stop: asyncio.Event) -> MergeOutcome:
        return await merge_under_load(stack, stop, config, after_s=2)

    calls, outcome, _ = _load(stack, merge)
    assert errors_of(calls) == []  # the load never noticed
    _each_kind_answered(calls)
    # a merge gets one attempt: the new worker finds the lease lapsed and fails the job, naming why
    assert outcome.status == "failed", outcome
    assert outcome.error and "died" in outcome.error, outcome.error
    assert outcome.result_slug is None and outcome.job["attempts"] == 1
    assert stack.api("GET", "/api/experts/smol-ties").status_code == 404  # nothing registered
    deadline = time.monotonic() + 10
    while (left := merge_leftovers(stack)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []  # no partial output, no temporary file in the store
    verify = stack.expert_verify()
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # the same merge again runs to success on the new worker and registers whole
    resp = stack.api("POST", "/api/merges", json=config)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    deadline = time.monotonic() + 300
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = stack.api("GET", f"/api/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    merged = stack.api("GET", "/api/experts/smol-ties").json()
    assert merged["kind"] == "merged" and merged["lineage"]["merge_job_id"] == job["id"]
    verify = stack.expert_verify()
    assert verify.returncode == 0 and "ok smol-ties" in verify.stdout, verify.stdout + verify.stderr
    assert merge_leftovers(stack) == []
