"""Load and faults (issue 21, item 3): many clients at once through `moerge serve` (uvicorn, a real subprocess)
with the vLLM engine, over a base and four LoRA adapters.

  (a) load: N clients for S seconds, a quarter each on the plain adapters, `auto` (embedding router, k=1),
      `pair` (embedding, k=2, `vote`) and `mix` (`arrow`, token-level: one adapter slot in vLLM), half of
      them streamed; then, on the plain adapters alone, the same clients through moerge and straight to the
      managed vLLM server, in alternating segments of one run (moerge, direct, direct, moerge, ...).
  (b) the same load with the managed vLLM server's API process SIGKILLed once: which requests fail, how, how
      soon after the kill; when answers resume; whether an engine-core process outlives the kill.
  (c) the same load while a `moerge worker` (beside `moerge serve --no-worker`) runs a merge job of two
      adapters, SIGKILLed mid-merge, then a new worker: how the job ends, what the registry and the store hold.

Every client sends fixed-length requests (max_tokens, `ignore_eos`, greedy) one after another, each with a
total timeout; a client refused with 503 waits min(Retry-After, 1 s) before its next request. The pieces
(`run_load`, `Stack`, `kill_vllm`, `analyze_kill`, `merge_under_load`) are shared with the CI versions in
tests/integration/test_load_faults.py (8 clients, 20 s, tiny models).

    .venv/bin/python -m bench.load [--clients 24 --seconds 120] [--only a,b,c]

Writes bench/results/load.json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from evals.harness import percentile  # noqa: E402

RETRY_CAP_S = 1.0  # a refused client waits min(Retry-After, this): the gap after a kill is measured to ~1 s
FAIL_WITHIN_S = 5.0  # a request in flight when the vLLM server dies must fail at most this long after the kill


@dataclass(frozen=True)
class Topic:
    """One adapter: its slug, what it says it does (the routers read it) and prompts of its kind."""

    slug: str
    description: str
    examples: tuple[str, ...]
    prompts: tuple[str, ...]


TOPICS = (
    Topic(
        "dates-lora",
        "Rewrites a date given in words as an ISO 8601 date (YYYY-MM-DD).",
        ("Convert 3 March 2021 to ISO format.", "Write July 4, 1999 as YYYY-MM-DD.", "ISO date of 9 Jan 2020?"),
        ("Convert 12 May 2003 to ISO format.", "Write the 1st of August 2015 as YYYY-MM-DD."),
    ),
    Topic(
        "units-lora",
        "Converts a quantity between units of measurement: kilometres, miles, kilograms, pounds.",
        ("Convert 3 km to metres.", "How many pounds is 5 kg?", "Express 10 miles in kilometres."),
        ("Convert 7 km to miles.", "How many grams are in 2.5 kg?"),
    ),
    Topic(
        "sentiment-lora",
        "Labels the sentiment of a product review as positive or negative.",
        ("Review: The battery died in a day. Sentiment?", "Is this review positive? I love these shoes."),
        ("Review: Great sound and it arrived early. Positive or negative?", "Sentiment of: the lid broke at once."),
    ),
    Topic(
        "arith-lora",
        "Two-number arithmetic: add, subtract or multiply and give the number.",
        ("What is 12 + 7?", "Compute 45 - 19.", "What is 8 times 6?"),
        ("What is 17 + 25?", "Compute 9 times 13."),
    ),
)
# (topic index, prompt), interleaved so consecutive requests of a client change topic
PROMPTS: tuple[tuple[int, str], ...] = tuple((t, TOPICS[t].prompts[p]) for p in range(2) for t in range(len(TOPICS)))


@dataclass(frozen=True)
class Kind:
    """A kind of model the load asks: ``models`` by topic (one name: a composition), on vLLM or not."""

    name: str
    models: tuple[str, ...]
    on_vllm: bool = True


def standard_kinds(adapters: Sequence[str]) -> list[Kind]:
    return [
        Kind("adapters", tuple(adapters)),
        Kind("auto (embedding, k=1)", ("auto",)),
        Kind("pair (embedding, k=2, vote)", ("pair",)),
        Kind("mix (arrow, token-level)", ("mix",)),  # one adapter slot in the managed vLLM server
    ]


@dataclass
class Call:
    """One request as its client saw it (times: time.monotonic())."""

    kind: str
    model: str
    stream: bool
    start: float
    on_vllm: bool = True
    end: float = 0.0
    status: int | None = None
    ok: bool = False
    tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    error: str = ""
    failed_at: float | None = None  # when the failure reached the client (its status line or its error event)
    first_token_at: float | None = None
    retry_after: float | None = None
    timed_out: bool = False
    chunk_models: set[str] = field(default_factory=set)  # the `model` every event of a stream named

    @property
    def latency_s(self) -> float:
        return self.end - self.start


def _fail(call: Call, error: str) -> None:
    call.ok = False
    call.error = call.error or error
    if call.failed_at is None:
        call.failed_at = time.monotonic()


def _check_usage(usage: Any, max_tokens: int) -> str | None:
    if not isinstance(usage, dict):
        return "no usage"
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if not (isinstance(completion, int) and isinstance(prompt, int) and prompt > 0 and completion >= 1):
        return f"bad usage {usage}"
    return None


def check_completion(body: Any, model: str, max_tokens: int) -> str | None:
    """Why a chat completion body is malformed, or None."""
    if not isinstance(body, dict) or body.get("object") != "chat.completion" or body.get("model") != model:
        return f"not a chat.completion of {model}: {str(body)[:200]}"
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return f"choices: {choices!r:.200}"
    message, finish = choices[0].get("message") or {}, choices[0].get("finish_reason")
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
        return f"message: {message!r:.200}"
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    return _check_usage(body.get("usage"), max_tokens)


async def _complete(http: httpx.AsyncClient, path: str, body: dict[str, Any], call: Call, max_tokens: int) -> None:
    resp = await http.post(path, json=body)
    call.status = resp.status_code
    if resp.status_code != 200:
        _refused(call, resp)
        return
    data = resp.json()
    problem = check_completion(data, body["model"], max_tokens)
    if problem:
        _fail(call, f"malformed: {problem}")
        return
    call.text = data["choices"][0]["message"]["content"]
    call.tokens = int(data["usage"]["completion_tokens"])
    call.prompt_tokens = int(data["usage"]["prompt_tokens"])
    call.ok = True


def _refused(call: Call, resp: httpx.Response) -> None:
    try:
        error = resp.json().get("error") or {}
        detail = f"{error.get('code')}: {error.get('message')}"
    except (json.JSONDecodeError, AttributeError):
        detail = resp.text[:200]
    _fail(call, f"HTTP {resp.status_code} {detail}")
    with contextlib.suppress(KeyError, ValueError):
        call.retry_after = float(resp.headers["retry-after"])


async def _stream(http: httpx.AsyncClient, path: str, body: dict[str, Any], call: Call, max_tokens: int) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    pieces: list[str] = []
    finish, usage, done, problem = None, None, False, None
    async with http.stream("POST", path, json=body) as resp:
        call.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            _refused(call, resp)
            return
        async for line in resp.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                problem = problem or f"not an SSE data line: {line[:100]!r}"
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:  # the stream had begun: the failure comes as an event
                error = event["error"] or {}
                _fail(call, f"error event {error.get('code')}: {error.get('message')}")
                continue
            if event.get("object") != "chat.completion.chunk":
                problem = problem or f"not a chat.completion.chunk: {data[:200]}"
            call.chunk_models.add(str(event.get("model")))  # checked apart: see misnamed_streams
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    call.first_token_at = call.first_token_at or time.monotonic()
                    pieces.append(text)
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                usage = event["usage"]
    if call.error:
        return
    problem = problem or ("no [DONE]" if not done else None) or ("no finish_reason" if finish is None else None)
    problem = problem or _check_usage(usage, max_tokens)
    if problem:
        _fail(call, f"malformed stream: {problem}")
        return
    call.text = "".join(pieces)
    call.tokens = int(usage["completion_tokens"]) if usage else 0
    call.prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    call.ok = True


async def run_load(
    url: str,
    headers: Mapping[str, str],
    kinds: Sequence[Kind],
    *,
    clients: int,
    stop: asyncio.Event,
    calls: list[Call] | None = None,
    max_tokens: int = 32,
    timeout_s: float = 60.0,
    names: Mapping[str, str] | None = None,
) -> list[Call]:
    """``clients`` clients, client i on ``kinds[i % len(kinds)]`` and streamed when ``(i // len(kinds))`` is
    odd, each sending one request after another until ``stop`` is set. ``names``: the name sent for a model
    (the adapter's name on a vLLM server asked directly). Every request is recorded in ``calls`` as it starts."""
    calls = [] if calls is None else calls
    names = names or {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=dict(headers), timeout=timeout_s, limits=limits) as http:

        async def client(index: int) -> None:
            kind = kinds[index % len(kinds)]
            streamed = (index // len(kinds)) % 2 == 1
            n = index
            while not stop.is_set():
                topic, prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                model = kind.models[topic % len(kind.models)]
                sent = names.get(model, model)
                body = {
                    "model": sent,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                call = Call(kind.name, model, streamed, time.monotonic(), on_vllm=kind.on_vllm)
                calls.append(call)
                try:
                    async with asyncio.timeout(timeout_s):
                        await (_stream if streamed else _complete)(http, "/v1/chat/completions", body, call, max_tokens)
                except TimeoutError:
                    call.timed_out = True
                    _fail(call, f"no answer within the client's {timeout_s:g} s timeout")
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    _fail(call, f"transport: {type(exc).__name__}: {exc}")
                call.end = time.monotonic()
                if not call.ok and call.retry_after is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), min(call.retry_after, RETRY_CAP_S))

        await asyncio.gather(*(client(i) for i in range(clients)))
    return calls


async def load_for(
    url: str,
    headers: Mapping[str, str],
    kinds: Sequence[Kind],
    *,
    clients: int,
    seconds: float,
    during: Callable[[asyncio.Event], Awaitable[Any]] | None = None,
    **options: Any,
) -> tuple[list[Call], Any, float]:
    """The load for ``seconds`` (and, with ``during``, until that coroutine also ends: it runs beside the load,
    given the stop event), then the requests in flight to their end. Returns the calls, ``during``'s result and
    the load's wall time: from its start to the stop (no request starts after it)."""
    stop = asyncio.Event()
    calls: list[Call] = []
    start = time.monotonic()
    load = asyncio.create_task(run_load(url, headers, kinds, clients=clients, stop=stop, calls=calls, **options))
    result = None
    stopped = start
    try:
        waits: list[Awaitable[Any]] = [asyncio.sleep(seconds)]
        if during is not None:
            waits.append(during(stop))
        gathered = await asyncio.gather(*waits)
        result = gathered[1] if during is not None else None
    finally:
        stop.set()
        stopped = time.monotonic()
        await load
    return calls, result, stopped - start


# --------------------------------------------------------------------------------------------- figures


def summarize(calls: Sequence[Call], wall_s: float) -> dict[str, dict[str, Any]]:
    """Per kind (and ``all``): calls, answers, errors, latency p50/p95/max of every answer, time to the first
    token of the streamed ones; answers/s and tokens/s of the answers that ended within the load's ``wall_s``
    (the requests still in flight at its stop finish later: a slow kind must not stretch a fast kind's time)."""
    window_end = min((c.start for c in calls), default=0.0) + wall_s
    out: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[Call]] = {}
    for call in calls:
        groups.setdefault(call.kind, []).append(call)
    groups["all"] = list(calls)
    for kind, group in groups.items():
        answered = [c for c in group if c.ok]
        latencies = [c.latency_s * 1000 for c in answered]
        ttft = [(c.first_token_at - c.start) * 1000 for c in answered if c.first_token_at is not None]
        out[kind] = {
            "calls": len(group),
            "answers": len(answered),
            "errors": len(group) - len(answered),
            "streamed": sum(c.stream for c in answered),
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "max_ms": max(latencies, default=float("nan")),
            "ttft_p50_ms": percentile(ttft, 50),
            "prompt_tokens_mean": sum(c.prompt_tokens for c in answered) / max(1, len(answered)),
            "answers_per_s": sum(1 for c in answered if c.end <= window_end) / wall_s,
            "tokens_per_s": sum(c.tokens for c in answered if c.end <= window_end) / wall_s,
        }
    return out


def call_records(calls: Sequence[Call]) -> list[dict[str, Any]]:
    """The calls as JSON rows, times in seconds from the first call's start (``--calls``)."""
    t0 = min((c.start for c in calls), default=0.0)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    return [
        {
            "kind": c.kind,
            "model": c.model,
            "stream": c.stream,
            "start": rel(c.start),
            "end": rel(c.end),
            "first_token": rel(c.first_token_at),
            "failed_at": rel(c.failed_at),
            "status": c.status,
            "ok": c.ok,
            "tokens": c.tokens,
            "prompt_tokens": c.prompt_tokens,
            "retry_after": c.retry_after,
            "error": c.error[:300],
            "chunk_models": sorted(c.chunk_models),
        }
        for c in calls
    ]


def errors_of(calls: Sequence[Call]) -> list[str]:
    return [f"{c.kind} {c.model} stream={c.stream}: {c.error}" for c in calls if not c.ok]


def misnamed_streams(calls: Sequence[Call], names: Mapping[str, str] | None = None) -> list[Call]:
    """The answered streams some event of which named another model than the one asked (``names``: the name
    sent for a model, as in :func:`run_load`)."""
    names = names or {}
    return [c for c in calls if c.ok and c.stream and c.chunk_models != {names.get(c.model, c.model)}]


@dataclass
class KillReport:
    """What a SIGKILL of the vLLM API process did to the load (times in seconds after the kill)."""

    noticed_after_s: float = float("nan")  # the first 503: moerge knew the server was dead
    in_flight: int = 0  # vLLM-served requests sent before moerge noticed, not finished at the kill
    in_flight_failed: int = 0
    in_flight_answered: int = 0  # their answer had come before the server died
    fail_after_kill_max_s: float = float("nan")  # the slowest in-flight failure to reach its client
    failure_kinds: dict[str, int] = field(default_factory=dict)  # "503", "502", "error event", ...
    refused_while_restarting: int = 0  # sent after moerge noticed, refused (503 + Retry-After)
    refusal_latency_max_s: float = float("nan")
    retry_after_s: list[float] = field(default_factory=list)  # the smallest and largest Retry-After refused with
    resumed_after_s: float = float("nan")  # the first vLLM-served answer to a request sent after the kill
    answered_after_resume: int = 0
    other_engine_answers: int = 0  # the token-level kind (torch engine): answered all along
    problems: list[str] = field(default_factory=list)  # what broke the rules; empty when every rule held


def _failure_kind(call: Call) -> str:
    if call.timed_out:
        return "timeout"
    if call.error.startswith("error event"):
        return "error event"
    if call.error.startswith("HTTP"):
        return str(call.status)
    return call.error.split(":", 1)[0]


def analyze_kill(calls: Sequence[Call], killed_at: float) -> KillReport:
    """Sort the load's requests around a kill at ``killed_at`` and check the rules: nothing fails before the
    kill or after answers resume; a request in flight fails with 502/503 or an error event within
    ``FAIL_WITHIN_S`` of the kill; one sent once moerge has noticed (its first 503) is refused at once with 503
    and Retry-After; the requests not served by vLLM all succeed; no request times out.

    In flight means sent before moerge noticed: a SIGKILLed process takes a moment to die, and a request that
    reached moerge in between went to the dying server like the ones before the kill."""
    report = KillReport()
    vllm = [c for c in calls if c.on_vllm]
    refusals = [c.failed_at for c in vllm if c.status == 503 and c.failed_at is not None and c.end > killed_at]
    noticed_at = min(refusals, default=killed_at + FAIL_WITHIN_S)
    report.noticed_after_s = noticed_at - killed_at
    resumed = [c.end for c in vllm if c.ok and c.start > killed_at]
    resumed_at = min(resumed) if resumed else float("inf")
    report.resumed_after_s = resumed_at - killed_at
    report.answered_after_resume = sum(1 for c in vllm if c.ok and c.start >= resumed_at)
    report.other_engine_answers = sum(1 for c in calls if not c.on_vllm and c.ok)
    delays, refusal_latencies = [], []
    for c in calls:
        if not c.ok:
            kind = _failure_kind(c)
            report.failure_kinds[kind] = report.failure_kinds.get(kind, 0) + 1
        if c.timed_out:
            report.problems.append(f"timed out: {c.kind} {c.model}")
        if not c.on_vllm:
            if not c.ok:
                report.problems.append(f"not on vLLM, yet failed: {c.kind}: {c.error}")
            continue
        if c.start < noticed_at and c.end > killed_at:
            report.in_flight += 1
            if c.ok:
                report.in_flight_answered += 1
                continue
            report.in_flight_failed += 1
            assert c.failed_at is not None
            delays.append(c.failed_at - killed_at)
            if _failure_kind(c) not in ("502", "503", "error event"):
                report.problems.append(f"in flight, failed otherwise than 502/503/error event: {c.error}")
        elif not c.ok and c.end <= killed_at:
            report.problems.append(f"failed before the kill: {c.error}")
        elif not c.ok and c.start >= resumed_at:
            report.problems.append(f"failed after answers resumed: {c.error}")
        elif not c.ok:  # sent after moerge noticed, before answers resumed
            report.refused_while_restarting += 1
            refusal_latencies.append(c.latency_s)
            if c.status != 503 or not c.retry_after:
                report.problems.append(f"sent while restarting, not a 503 with Retry-After: {c.error}")
    report.fail_after_kill_max_s = max(delays, default=float("nan"))
    report.refusal_latency_max_s = max(refusal_latencies, default=float("nan"))
    retry = [c.retry_after for c in vllm if c.status == 503 and c.retry_after]
    report.retry_after_s = [min(retry), max(retry)] if retry else []
    if delays and max(delays) > FAIL_WITHIN_S:
        report.problems.append(f"an in-flight request failed {max(delays):.1f} s after the kill")
    if refusal_latencies and max(refusal_latencies) > FAIL_WITHIN_S:
        report.problems.append(f"a refusal took {max(refusal_latencies):.1f} s")
    if resumed_at == float("inf"):
        report.problems.append("answers never resumed")
    return report


# --------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MOERGE = Path(sys.executable).with_name("moerge")


def wait_ready(
    url: str, name: str, alive: Callable[[], bool], log_tail: Callable[[], str], timeout_s: float, poll_s: float = 0.2
) -> None:
    """Poll ``url`` until it answers 200; RuntimeError with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise RuntimeError(f"{name} exited\n{log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become ready\n{log_tail()}")
        time.sleep(poll_s)


class Proc:
    """One `moerge ...` child process, its output in ``log``."""

    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, list(args), dict(env), log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([str(MOERGE), *self.args], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n{text[-chars:]}"


def moerge_env(home: Path, import_roots: Sequence[Path], **extra: str) -> dict[str, str]:
    """A child's environment: this one's without MOERGE_* (but the cache), then moerge's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_") or k == "MOERGE_CACHE"}
    env.update(
        MOERGE_HOME=str(home),
        MOERGE_ENGINE="vllm",
        MOERGE_HOST="127.0.0.1",
        MOERGE_IMPORT_ROOTS=":".join(str(p) for p in import_roots),
        **extra,
    )
    return env


@dataclass
class Stack:
    """`moerge serve --no-worker` and `moerge worker` processes on one home (SQLite, one store)."""

    home: Path
    env: dict[str, str]
    admin_key: str
    server: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_key}"}

    def init(self) -> None:
        """`moerge init`: the database migrated, the admin key (MOERGE_ADMIN_KEY) created."""
        subprocess.run([str(MOERGE), "init"], env={**self.env, "MOERGE_ADMIN_KEY": self.admin_key}, check=True,
                       capture_output=True)  # fmt: skip

    def start_server(self, timeout_s: float = 180) -> None:
        self.port = free_port()
        env = {**self.env, "MOERGE_PORT": str(self.port)}
        self.server = server = Proc("serve", ["serve", "--no-worker"], env, self.home / "serve.log").start()
        wait_ready(f"{self.url}/api/ready", "moerge serve", server.alive, server.log_tail, timeout_s)

    def start_worker(self, timeout_s: float = 120) -> Proc:
        n = len(self.workers) + 1
        worker = Proc(f"worker-{n}", ["worker"], self.env, self.home / f"worker-{n}.log").start()
        self.workers.append(worker)
        deadline = time.monotonic() + timeout_s
        while ": runs " not in worker.log.read_text(errors="replace"):  # it printed "worker <name>: runs ..."
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"moerge worker did not start\n{worker.log_tail()}")
            time.sleep(0.2)
        return worker

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 600)
        return httpx.request(method, f"{self.url}{path}", headers=self.headers, **kwargs)

    def vllm_server(self) -> dict[str, Any]:
        """The managed vLLM server's entry in the admin view of /api/engines (url, pid, adapters, restarts)."""
        servers = self.api("GET", "/api/engines").json()["servers"]
        (server,) = [s for s in servers if "url" in s and s.get("engine", "vllm") == "vllm"]
        return dict(server)

    def expert_verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(MOERGE), "expert", "verify"], env=self.env, capture_output=True, text=True)

    def stop(self) -> None:
        """Stop every process; then kill any vLLM process group the server left (it stops them on SIGTERM)."""
        groups = set()
        if self.server is not None and self.server.alive():
            with contextlib.suppress(Exception):
                groups.add(int(self.vllm_server()["pid"] or 0))
        for proc in [*self.workers, *([self.server] if self.server else [])]:
            proc.stop()
        for pgid in groups - {0}:
            if group_pids(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)

    def tails(self) -> str:
        return "\n".join(p.log_tail() for p in [*([self.server] if self.server else []), *self.workers])


def import_expert(stack: Stack, folder: Path, slug: str, **spec: Any) -> dict[str, Any]:
    """Register a folder through POST /api/experts/import (the folder lies under MOERGE_IMPORT_ROOTS)."""
    resp = stack.api("POST", "/api/experts/import", json={"path": str(folder), "expert": {"slug": slug, **spec}})
    if resp.status_code != 201:
        raise RuntimeError(f"import of {slug} failed: {resp.status_code} {resp.text}")
    return dict(resp.json())


def register_topics(stack: Stack, base: Path, adapters: Sequence[Path], base_slug: str = "base") -> list[str]:
    """The base and one adapter per topic, each described so the routers can tell them apart."""
    import_expert(stack, base, base_slug, task_description="General chat.")
    slugs = []
    for topic, folder in zip(TOPICS, adapters, strict=True):
        import_expert(
            stack,
            folder,
            topic.slug,
            base=base_slug,
            task_description=topic.description,
            description=topic.description,
            example_prompts=list(topic.examples),
        )
        slugs.append(topic.slug)
    return slugs


def create_compositions(stack: Stack, adapters: Sequence[str], base_slug: str = "base") -> None:
    """`auto` (embedding, k=1), `pair` (embedding, k=2, vote), both with the base as fallback; `mix` (arrow,
    top-2)."""
    bodies: list[dict[str, Any]] = [
        {"name": "auto", "router": "embedding", "experts": list(adapters), "fallback": base_slug},
        {
            "name": "pair",
            "router": "embedding",
            "experts": list(adapters),
            "k": 2,
            "aggregator": "vote",
            "fallback": base_slug,
        },
        {"name": "mix", "router": "arrow", "router_params": {"top_k": 2}, "experts": list(adapters)},
    ]
    for body in bodies:
        resp = stack.api("POST", "/api/compositions", json=body)
        if resp.status_code != 201:
            raise RuntimeError(f"composition {body['name']}: {resp.status_code} {resp.text}")


def warm_up(stack: Stack, kinds: Sequence[Kind], timeout_s: float = 900) -> None:
    """One answer from every model of every kind: starts vLLM, loads each adapter, loads the torch engine's
    mixture, before anything is timed."""
    deadline = time.monotonic() + timeout_s
    for kind in kinds:
        for i, model in enumerate(kind.models):
            while True:
                prompt = TOPICS[i].prompts[0]
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
                try:
                    resp = stack.api("POST", "/v1/chat/completions", json=body, timeout=300)
                    if resp.status_code == 200:
                        break
                    last = f"{resp.status_code} {resp.text[:300]}"
                    if resp.status_code < 500:  # refused: waiting would not help
                        raise RuntimeError(f"{model} refused the warm-up request: {last}")
                except httpx.HTTPError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline or not (stack.server and stack.server.alive()):
                    raise RuntimeError(f"{model} never answered: {last}\n{stack.tails()}")
                time.sleep(2)


def _process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, process group) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    return sorted(pid for pid, (state, _, group) in _process_table().items() if group == pgid and state != "Z")


def process_tree(pid: int) -> list[int]:
    """``pid``, its process group and all its descendants (a child could have left the group), live ones."""
    table = _process_table()
    found = {p for p, (state, _, group) in table.items() if group == pid and state != "Z"}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (state, ppid, _) in table.items():
            if ppid == parent and child not in found and state != "Z":
                found.add(child)
                frontier.append(child)
    return sorted(found | ({pid} if pid in table and table[pid][0] != "Z" else set()))


def process_names(pids: Sequence[int]) -> dict[int, str]:
    names = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
    return names


def still_running(processes: Mapping[int, str]) -> dict[int, str]:
    """Those of ``processes`` (pid -> command line) alive now, not zombies, with the same command line (a pid
    reused since is another process)."""
    table = _process_table()
    now = process_names([p for p in processes if p in table and table[p][0] != "Z"])
    return {pid: line for pid, line in now.items() if line == processes[pid]}


@dataclass
class Kill:
    pid: int
    group: dict[int, str]  # the server's processes before the kill (group and descendants): pid -> command line
    at: float  # time.monotonic()


def kill_vllm(stack: Stack) -> Kill:
    """SIGKILL the managed vLLM server's API process alone (its engine-core children are left to moerge)."""
    pid = int(stack.vllm_server()["pid"])
    group = process_names(process_tree(pid))
    os.kill(pid, signal.SIGKILL)
    return Kill(pid, group, time.monotonic())


async def wait_vllm_ready(stack: Stack, restarts: int, timeout_s: float) -> dict[str, Any]:
    """The vLLM server once it is ready again after ``restarts`` restarts in all."""
    deadline = time.monotonic() + timeout_s
    while True:
        server = await asyncio.to_thread(stack.vllm_server)
        if server["state"] == "ready" and server["restarts"] >= restarts:
            return server
        if time.monotonic() > deadline:
            raise RuntimeError(f"the vLLM server is not back after {timeout_s:g} s: {server}")
        await asyncio.sleep(0.5)


async def kill_under_load(stack: Stack, stop: asyncio.Event, *, after_s: float, restart_timeout_s: float) -> Kill:
    """Beside the load: kill the vLLM API process after ``after_s``, wait for the restart, then let the load
    run on a little (answers resume) before the caller's stop."""
    before = await asyncio.to_thread(stack.vllm_server)
    await asyncio.sleep(after_s)
    kill = await asyncio.to_thread(kill_vllm, stack)
    await wait_vllm_ready(stack, before["restarts"] + 1, restart_timeout_s)
    await asyncio.sleep(after_s)  # answers after the restart, under the same load
    return kill


TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class MergeOutcome:
    job_id: str
    killed_at_progress: float
    killed_after_s: float  # from submission
    new_worker_after_kill_s: float = float("nan")  # until the new worker runs (a Python start, under load)
    status: str = ""
    error: str | None = None
    settled_after_kill_s: float = float("nan")
    result_slug: str | None = None
    job: dict[str, Any] = field(default_factory=dict)


async def merge_under_load(
    stack: Stack, stop: asyncio.Event, config: dict[str, Any], *, after_s: float, timeout_s: float = 300
) -> MergeOutcome:
    """Beside the load: submit ``config`` to POST /api/merges, SIGKILL the worker running it once it has made
    progress, start a new worker, wait until the job ends."""
    await asyncio.sleep(after_s)
    resp = await asyncio.to_thread(stack.api, "POST", "/api/merges", json=config)
    if resp.status_code != 201:
        raise RuntimeError(f"merge submission: {resp.status_code} {resp.text}")
    job_id = resp.json()["id"]
    submitted = time.monotonic()
    deadline = submitted + timeout_s

    async def job() -> dict[str, Any]:
        got = await asyncio.to_thread(stack.api, "GET", f"/api/jobs/{job_id}")
        return dict(got.json())

    while not ((state := await job())["status"] == "running" and state["progress"] > 0.05 and state["owner"]):
        if state["status"] in TERMINAL or time.monotonic() > deadline:
            raise RuntimeError(f"the merge was not seen running: {state}")
        await asyncio.sleep(0.1)
    pid = int(str(state["owner"]).split(":")[-2])  # owner: host:pid:random
    (victim,) = [w for w in stack.workers if w.pid == pid]
    await asyncio.to_thread(victim.kill)
    killed = time.monotonic()
    outcome = MergeOutcome(job_id, float(state["progress"]), killed - submitted)
    await asyncio.to_thread(stack.start_worker)
    outcome.new_worker_after_kill_s = time.monotonic() - killed
    while (state := await job())["status"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the merge did not end: {state}\n{stack.tails()}")
        await asyncio.sleep(0.2)
    outcome.settled_after_kill_s = time.monotonic() - killed
    outcome.status, outcome.error, outcome.job = state["status"], state.get("error"), state
    outcome.result_slug = (state.get("result_expert") or {}).get("slug")
    await asyncio.sleep(min(after_s, 5))  # the load runs on a little after the job ended
    return outcome


def merge_leftovers(stack: Stack) -> list[str]:
    """What a merge left in the home: outputs under merges/, temporary files of the store."""
    left = []
    for folder in (stack.home / "merges", stack.home / "store" / "tmp"):
        if folder.exists():
            left += [str(p) for p in folder.iterdir()]
    return left


# --------------------------------------------------------------------------------------------- the benchmark


def _table(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| model | requests | answers | errors | p50 ms | p95 ms | max ms | first token p50 ms (streamed) "
        "| answers/s | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, s in summary.items():
        lines.append(
            f"| {kind} | {s['calls']} | {s['answers']} | {s['errors']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
            f"| {s['max_ms']:.0f} | {s['ttft_p50_ms']:.0f} | {s['answers_per_s']:.2f} | {s['tokens_per_s']:.1f} |"
        )
    return lines


DIRECT_ORDER = ("moerge", "direct", "direct", "moerge")  # repeated: drift falls on both paths alike


async def compare_direct(
    stack: Stack,
    adapters: Sequence[str],
    *,
    clients: int,
    seconds: float,
    max_tokens: int,
    timeout_s: float,
    segments: int = 8,
) -> dict[str, Any]:
    """The plain adapters alone, all clients through moerge or straight to the vLLM server (its URL from the
    admin view of /api/engines, each adapter by its registry id, the name moerge loads it under), ``segments``
    of ``seconds`` each in the order moerge, direct, direct, moerge, ...; per path the answers that ended within
    their segment, over the segments' time."""
    server = stack.vllm_server()
    ids = {slug: stack.api("GET", f"/api/experts/{slug}").json()["id"] for slug in adapters}
    missing = set(ids.values()) - set(server["adapters"])
    if missing:
        raise RuntimeError(f"adapters not loaded on the vLLM server: {missing}")
    kinds = [Kind("adapters", tuple(adapters))]
    paths: dict[str, list[Call]] = {"moerge": [], "direct": []}
    walls = {"moerge": 0.0, "direct": 0.0}
    counted: dict[str, list[Call]] = {"moerge": [], "direct": []}
    rows = []
    for i in range(segments):
        path = DIRECT_ORDER[i % len(DIRECT_ORDER)]
        url, headers, names = (stack.url, stack.headers, None) if path == "moerge" else (server["url"], {}, ids)
        calls, _, wall = await load_for(
            url, headers, kinds, clients=clients, seconds=seconds, max_tokens=max_tokens, timeout_s=timeout_s,
            names=names,
        )  # fmt: skip
        segment_end = min(c.start for c in calls) + wall
        within = [c for c in calls if c.ok and c.end <= segment_end]
        paths[path] += calls
        walls[path] += wall
        counted[path] += within
        rows.append({"path": path, "answers": len(within), "tokens_per_s": sum(c.tokens for c in within) / wall})
    out: dict[str, Any] = {"segments": rows, "segment_s": seconds, "vllm_url": server["url"]}
    for path, calls in paths.items():
        out[path] = summarize(calls, float("inf"))["all"] | {
            "wall_s": walls[path],
            "answers_per_s": len(counted[path]) / walls[path],
            "tokens_per_s": sum(c.tokens for c in counted[path]) / walls[path],
            "errors_seen": errors_of(calls),
            "misnamed_streams": len(misnamed_streams(calls, ids if path == "direct" else None)),
        }
    out["ratio_answers"] = out["moerge"]["answers_per_s"] / out["direct"]["answers_per_s"]
    out["ratio_tokens"] = out["moerge"]["tokens_per_s"] / out["direct"]["tokens_per_s"]
    return out


def _random_adapters(base: Path, folder: Path, count: int) -> list[Path]:
    from bench.serving_multi_lora import make_adapters

    return make_adapters(base, folder, count)


@contextlib.contextmanager
def bench_stack(work: Path, stale_s: int) -> Iterator[tuple[Stack, list[str]]]:
    from registry.convert import cached_smollm2

    base = cached_smollm2()
    adapters = _random_adapters(base, work / "adapters", len(TOPICS))
    home = work / "home"
    env = moerge_env(
        home,
        [work, base],
        MOERGE_MERGE_STALE_S=str(stale_s),
        MOERGE_STORE_ORPHAN_AGE_S="0",  # one writer at a time here: the new worker sweeps at once
    )
    stack = Stack(home, env, "bench-load-admin-key-0123456789")
    done = False
    try:
        stack.init()
        stack.start_server()
        stack.start_worker()
        slugs = register_topics(stack, base, adapters)
        create_compositions(stack, slugs)
        yield stack, slugs
        done = True
    finally:
        stack.stop()
        if done:  # a copy of SmolLM2 in the store, the adapters, the logs
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (the processes' logs are in {home})", file=sys.stderr)


def _load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


class CpuShare:
    """How busy the machine was: the CPU time of this process and its descendants (moerge, its workers, vLLM),
    sampled every second (a process's last second is lost), against the machine's busy time (/proc/stat).
    ``since(mark)``: the cores each used on average since ``mark()``."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._seen: dict[tuple[int, int], float] = {}  # (pid, start time) -> its CPU seconds so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def _sample(self) -> None:
        for pid in process_tree(os.getpid()):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                # after the name: state is field 3, utime 14, stime 15, starttime 22
                self._seen[(pid, int(fields[19]))] = (int(fields[11]) + int(fields[12])) / self._tick

    def _busy_s(self) -> float:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(values) - values[3] - values[4]) / self._tick  # all but idle and iowait

    def mark(self) -> tuple[float, float, float]:
        self._sample()
        return time.monotonic(), self._busy_s(), sum(self._seen.values())

    def since(self, mark: tuple[float, float, float]) -> dict[str, float]:
        now = self.mark()
        elapsed = now[0] - mark[0]
        ours = (now[2] - mark[2]) / elapsed
        return {"ours_cores": ours, "others_cores": max(0.0, (now[1] - mark[1]) / elapsed - ours)}

    def close(self) -> None:
        self._stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300, help="each request's total client timeout, s")
    parser.add_argument("--only", default="a,b,c", help="comma-separated scenarios: a, b, c")
    parser.add_argument("--calls", type=Path, help="also write every request (kind, times, status, error) here")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    opts = {"clients": args.clients, "max_tokens": args.max_tokens, "timeout_s": args.timeout}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "clients": args.clients,
        "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "timeout_s": args.timeout,
        "load_before": _load_avg(),
    }
    work = Path(tempfile.mkdtemp(prefix="moerge-load-"))
    stale_s = 5
    cpu = CpuShare()
    whole = cpu.mark()
    raw: dict[str, list[dict[str, Any]]] = {}  # scenario -> every request (--calls)
    with bench_stack(work, stale_s) as (stack, slugs):
        kinds = standard_kinds(slugs)
        t0 = time.monotonic()
        warm_up(stack, kinds)
        results["warm_up_s"] = time.monotonic() - t0
        results["vllm_start_s"] = stack.vllm_server().get("startup_s")
        if "a" in only:
            mark = cpu.mark()
            calls, _, wall = asyncio.run(load_for(stack.url, stack.headers, kinds, seconds=args.seconds, **opts))
            misnamed = misnamed_streams(calls)
            raw["a"] = call_records(calls)
            results["a"] = {
                "summary": summarize(calls, wall),
                "wall_s": wall,
                "errors": errors_of(calls),
                "misnamed_streams": len(misnamed),
                "streams": sum(c.ok and c.stream for c in calls),
                "misnamed_as": sorted({m for c in misnamed for m in c.chunk_models}),
                "load_avg": _load_avg(),
                "cpu": cpu.since(mark),
            }
            mark = cpu.mark()
            print("\n".join(_table(results["a"]["summary"])), flush=True)
            results["a"]["direct"] = asyncio.run(compare_direct(stack, slugs, seconds=args.seconds / 4, **opts))
            results["a"]["direct"]["load_avg"] = _load_avg()
            results["a"]["direct"]["cpu"] = cpu.since(mark)
            print(json.dumps({k: v for k, v in results["a"]["direct"].items()}, indent=1, default=str), flush=True)
        if "b" in only:

            async def kill(stop: asyncio.Event) -> Kill:
                return await kill_under_load(stack, stop, after_s=args.seconds / 4, restart_timeout_s=600)

            mark = cpu.mark()
            calls, killed, wall = asyncio.run(
                load_for(stack.url, stack.headers, kinds, seconds=args.seconds, during=kill, **opts)
            )
            time.sleep(2)  # then look for what outlived the kill
            report = analyze_kill(calls, killed.at)
            raw["b"] = call_records(calls)
            results["b"] = {
                "summary": summarize(calls, wall),
                "wall_s": wall,
                "report": asdict(report),
                "killed_group": killed.group,
                "outlived": still_running(killed.group),
                "server": {k: v for k, v in stack.vllm_server().items() if k in ("state", "restarts", "startup_s")},
                "load_avg": _load_avg(),
                "cpu": cpu.since(mark),
            }
            print(json.dumps(results["b"], indent=1, default=str), flush=True)
        if "c" in only:
            config = {
                "merge_method": "ties",
                "base_model": "base",
                "models": [
                    {"model": slugs[0], "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": slugs[1], "parameters": {"weight": 1.0, "density": 0.5}},
                ],
                "output": {"format": "lora", "rank": 8},  # the served adapters' rank: no rank restart
                "name": "dates-units-ties",
            }

            async def merge(stop: asyncio.Event) -> MergeOutcome:
                return await merge_under_load(stack, stop, config, after_s=args.seconds / 8)

            mark = cpu.mark()
            calls, outcome, wall = asyncio.run(
                load_for(stack.url, stack.headers, kinds, seconds=args.seconds, during=merge, **opts)
            )
            verify = stack.expert_verify()
            named = stack.api("GET", "/api/experts/dates-units-ties")
            raw["c"] = call_records(calls)
            results["c"] = {
                "summary": summarize(calls, wall),
                "wall_s": wall,
                "errors": errors_of(calls),
                "merge": asdict(outcome),
                "stale_s": stale_s,
                "expert_after": named.status_code,
                "leftovers": merge_leftovers(stack),
                "verify_exit": verify.returncode,
                "verify_tail": (verify.stdout + verify.stderr)[-300:],
                "load_avg": _load_avg(),
                "cpu": cpu.since(mark),
            }
            # the same merge again, on the new worker, with no kill: it registers and answers at once
            t1 = time.monotonic()
            again = stack.api("POST", "/api/merges", json=config)
            job = again.json()
            while job.get("status") not in TERMINAL:
                time.sleep(0.5)
                job = stack.api("GET", f"/api/jobs/{job['id']}").json()
            query = {"model": config["name"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            answer = stack.api("POST", "/v1/chat/completions", json=query)
            results["c"]["rerun"] = {
                "status": job["status"],
                "seconds": time.monotonic() - t1,
                "answer_status": answer.status_code,
                "answer": answer.json()["choices"][0]["message"]["content"]
                if answer.status_code == 200
                else answer.text,
                "verify_exit": stack.expert_verify().returncode,
            }
            print(json.dumps(results["c"], indent=1, default=str), flush=True)
    results["load_after"] = _load_avg()
    results["cpu"] = cpu.since(whole)
    cpu.close()
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/load.json").write_text(json.dumps(results, indent=1, default=str))
    if args.calls:
        args.calls.write_text(json.dumps(raw))
    body = report_markdown(results)
    write_section(ROOT / "bench/RESULTS.md", "Load and faults (issue 21)", body)
    print(body)


def _busy(cpu: Mapping[str, float]) -> str:
    return (
        f"this benchmark's processes used {cpu['ours_cores']:.2f} cores on average, other jobs "
        f"{cpu['others_cores']:.2f}"
    )


def _span(values: Sequence[float]) -> str:
    return (
        "none"
        if not values
        else f"{min(values):g}"
        if min(values) == max(values)
        else f"{min(values):g}-{max(values):g}"
    )


def report_markdown(r: Mapping[str, Any]) -> str:
    lines = [
        f"`bench/load.py`: `moerge serve --no-worker` (uvicorn, a subprocess) and a `moerge worker`, engine vLLM "
        f"(one managed server), SmolLM2-135M-Instruct with four rank-8 LoRAs of random non-zero B (the demo's "
        f"trained experts are not cached on this machine; a random adapter costs vLLM the same to serve). "
        f"{r['clients']} clients, a quarter on each kind of model, half of them streamed, one request after "
        f"another for {r['seconds']:.0f} s; each request {r['max_tokens']} tokens (`ignore_eos`), greedy, "
        f"{r['timeout_s']:.0f} s client timeout. {r['machine']}, shared with other jobs: load average "
        f"(1/5/15 min) {r['load_before']} before, {r['load_after']} after; {_busy(r['cpu'])} over the whole run.",
        "",
    ]
    if "a" in r:
        a = r["a"]
        lines += [f"### (a) {r['clients']} clients, {a['wall_s']:.0f} s ({_busy(a['cpu'])})", ""]
        lines += _table(a["summary"])
        d = a["direct"]
        lines += [
            "",
            f"Errors: {len(a['errors'])}. Answers/s and tokens/s count the answers that ended within the "
            f"{r['seconds']:.0f} s; latencies every answer (the requests in flight at the end finished after it). "
            "`mix` runs in the torch engine inside moerge's process (vLLM cannot mix adapters per token), on the "
            "same two cores as the vLLM server.",
            f"Streamed answers whose events named another model than the one asked: {a['misnamed_streams']} of "
            f"{a['streams']} (named {a['misnamed_as']})."
            if a.get("misnamed_streams")
            else "",
            "",
            f"The plain adapters alone, the same {r['clients']} clients through moerge and straight to the vLLM "
            f"server, {len(d['segments'])} segments of {d['segment_s']:.0f} s in the order "
            f"{', '.join(row['path'] for row in d['segments'])} ({_busy(d['cpu'])}):",
            "",
            "| path | answers | errors | p50 ms | p95 ms | answers/s | tokens/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for path in ("moerge", "direct"):
            s = d[path]
            lines.append(
                f"| {path} | {s['answers']} | {s['errors']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
                f"| {s['answers_per_s']:.2f} | {s['tokens_per_s']:.1f} |"
            )
        lines += [
            "",
            f"Throughput through moerge / direct: **{d['ratio_tokens']:.2f}** in tokens/s, {d['ratio_answers']:.2f} "
            f"in answers/s (target >= 0.90); the same prompts on both paths ({d['moerge']['prompt_tokens_mean']:.1f} "
            f"and {d['direct']['prompt_tokens_mean']:.1f} prompt tokens a request). Tokens/s segment by segment: "
            + ", ".join(f"{row['path']} {row['tokens_per_s']:.0f}" for row in d["segments"])
            + ".",
        ]
    if "b" in r:
        b, k = r["b"], r["b"]["report"]
        lines += ["", "### (b) the vLLM server's API process SIGKILLed under the same load", "", _busy(b["cpu"]), ""]
        lines += _table(b["summary"])
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(k["failure_kinds"].items())) or "none"
        lines += [
            "",
            f"- moerge noticed the death (its first 503) {k['noticed_after_s']:.2f} s after the kill.",
            f"- In flight (sent before that, unfinished at the kill): {k['in_flight']} requests on vLLM; "
            f"{k['in_flight_failed']} failed, the last of them {k['fail_after_kill_max_s']:.2f} s after the kill "
            f"(rule: 5 s); {k['in_flight_answered']} had their answer already. Failures in all: {kinds}.",
            f"- Sent while the server restarted: {k['refused_while_restarting']} refused with 503 + Retry-After "
            f"({_span(k['retry_after_s'])} s), each "
            f"within {k['refusal_latency_max_s']:.2f} s (clients waited min(Retry-After, 1 s) before the next).",
            f"- Answers resumed **{k['resumed_after_s']:.1f} s** after the kill (restart: "
            f"{b['server'].get('startup_s') or float('nan'):.1f} s); {k['answered_after_resume']} answers after that, "
            f"none failed. Models served off vLLM answered {k['other_engine_answers']} times meanwhile (none is since "
            "token-level mixtures run in vLLM).",
            f"- No request hung: none reached the client timeout. Rule breaks: {k['problems'] or 'none'}.",
            f"- The killed group had {len(b['killed_group'])} processes ("
            + ", ".join(sorted({v.split(" ")[0].rsplit("/", 1)[-1] or "?" for v in b["killed_group"].values()}))
            + f"); still alive 2 s after the restart: {len(b['outlived'])} "
            + (
                "(moerge SIGKILLs the whole group when the API process dies)."
                if not b["outlived"]
                else f"{b['outlived']}."
            ),
        ]
    if "c" in r:
        c, m = r["c"], r["c"]["merge"]
        lines += ["", "### (c) a merge job's worker SIGKILLed mid-merge under the same load", "", _busy(c["cpu"]), ""]
        lines += _table(c["summary"])
        lines += [
            "",
            f"- TIES of two adapters, output a rank-8 LoRA (the served adapters' rank), run by a `moerge worker` "
            f"beside `moerge serve "
            f"--no-worker`; the worker SIGKILLed {m['killed_after_s']:.1f} s after submission at "
            f"{m['killed_at_progress']:.0%}, a new worker started (MOERGE_MERGE_STALE_S={c['stale_s']}).",
            f"- The job ended **{m['status']}** {m['settled_after_kill_s']:.1f} s after the kill (the new worker ran "
            f"{m['new_worker_after_kill_s']:.1f} s after it): {m['error']!r}.",
            f"- The expert's name afterwards: HTTP {c['expert_after']}; left in merges/ and the store's tmp: "
            f"{c['leftovers'] or 'nothing'}; `moerge expert verify` exit {c['verify_exit']}.",
            f"- The load meanwhile: {len(c['errors'])} errors.",
            f"- The same merge submitted again (no load, no kill): {c['rerun']['status']} in "
            f"{c['rerun']['seconds']:.1f} s; the merged LoRA's first query: HTTP {c['rerun']['answer_status']} "
            f"({c['rerun']['answer'][:80]!r}); `moerge expert verify` exit {c['rerun']['verify_exit']}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
