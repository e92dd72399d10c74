"""OpenTelemetry traces of requests through a live server (torch engine, tiny models, the real MiniLM embedder):
the server span continues the caller's trace, with resolve, route, one generate span per member and aggregate
under it, each with its attributes; a failure marks the span it happened in.

The global tracer provider can be set once per process: the first test to need it installs an SDK provider whose
sampler records only while a test collects spans (``spans``), into that test's in-memory exporter. Outside such a
test every span is a non-recording one, as with the API's no-op tracer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from core import tracing
from registry.schemas import ExpertSpec
from registry.store import ArtifactStore
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_lora


class _WhileCollecting(Sampler):
    """Records a span only while a test collects them."""

    collecting = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.collecting else Decision.DROP, attributes)

    def get_description(self) -> str:
        return "while a test collects spans"


_SAMPLER = _WhileCollecting()


def _test_provider() -> TracerProvider:
    if not tracing.tracing_active():
        trace.set_tracer_provider(TracerProvider(sampler=_SAMPLER))
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider) and provider.sampler is _SAMPLER, "a provider was installed before"
    return provider


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    _test_provider().add_span_processor(SimpleSpanProcessor(exporter))  # a provider cannot drop one: it stays
    _SAMPLER.collecting = True
    try:
        yield exporter
    finally:
        _SAMPLER.collecting = False
        exporter.shutdown()  # keeps nothing more


MATH = ExpertSpec(
    slug="math-lora",
    base="tiny-base",
    task_description="Two-number arithmetic: add, subtract or multiply and give the number.",
    example_prompts=["What is 12 + 7?", "Compute 45 - 19.", "What is 8 times 6?"],
)
DATES = ExpertSpec(
    slug="dates-lora",
    base="tiny-base",
    task_description="Rewrite a date given in words as an ISO 8601 date (YYYY-MM-DD).",
    example_prompts=["Convert 3 March 2021 to ISO format.", "Write July 4, 1999 as YYYY-MM-DD."],
)
BROKEN = ExpertSpec(slug="broken-lora", base="tiny-base", task_description="Arithmetic with two numbers.")
CHAT = [{"role": "user", "content": "What is 17 + 25?"}]


@pytest.fixture
def live(
    spans: InMemorySpanExporter, registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A live server made while a provider is installed (the app adds its server-span middleware then)."""
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base", task_description="General chat."))
    for i, spec in enumerate((MATH, DATES, BROKEN)):
        register(settings, build_tiny_lora(tiny_base, tmp_path / spec.slug, seed=30 + i), spec)
    with serve(settings, TorchEngine()) as url:
        yield {"url": url, "env": registry_env, "spans": spans}


def _post(live: dict[str, Any], path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    auth = live["env"].admin if path.startswith("/api/compositions") else live["env"].query
    return httpx.post(f"{live['url']}{path}", headers={**auth, **headers}, json=body, timeout=120)


def _trace_of(
    live: dict[str, Any], name: str, where: Callable[[ReadableSpan], bool] = lambda _: True
) -> list[ReadableSpan]:
    """Every span of the trace whose server span is ``name`` (the last such), once that span has ended: the
    server ends it after the response's last byte is sent, which can be just after the client has read it."""
    exporter: InMemorySpanExporter = live["spans"]
    deadline = time.monotonic() + 10
    while True:
        servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER and s.name == name]
        servers = [s for s in servers if where(s)]
        if servers or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert servers, f"no server span {name!r} in {[s.name for s in exporter.get_finished_spans()]}"
    trace_id = servers[-1].context.trace_id
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r} in {[s.name for s in spans]}"
    return found[0]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _status_code(server: ReadableSpan) -> Any:
    """The HTTP status on a server span (its name depends on OTEL_SEMCONV_STABILITY_OPT_IN)."""
    attributes = _attrs(server)
    return attributes.get("http.response.status_code", attributes.get("http.status_code"))


def _child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


def test_expert_request_is_traced(live: dict[str, Any]) -> None:
    resp = _post(live, "/v1/chat/completions", {"model": "math-lora", "messages": CHAT, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    spans = _trace_of(live, "POST /v1/chat/completions")
    server = _one(spans, "POST /v1/chat/completions")
    assert server.parent is None and _attrs(server)["http.route"] == "/v1/chat/completions"
    assert _status_code(server) == 200
    resolve, generate = _one(spans, "resolve"), _one(spans, "generate")
    assert _child_of(resolve, server) and _child_of(generate, server)
    assert _attrs(resolve) == {tracing.MODEL: "math-lora", tracing.ROUTER: "none", tracing.EXPERTS: ("math-lora",)}
    usage = resp.json()["usage"]
    assert _attrs(generate) == {
        tracing.EXPERT: "math-lora",
        tracing.ENGINE: "torch",
        tracing.INPUT_TOKENS: usage["prompt_tokens"],
        tracing.OUTPUT_TOKENS: usage["completion_tokens"],
    }
    assert not [s for s in spans if s.name in ("route", "aggregate")]
    assert all(s.status.status_code != StatusCode.ERROR for s in spans)

    # streamed: the generate span lasts to the stream's end and reports its usage
    with httpx.stream(
        "POST",
        f"{live['url']}/v1/completions",
        headers=live["env"].query,
        json={"model": "dates-lora", "prompt": "hello", "max_tokens": 5, "stream": True},
        timeout=60,
    ) as streamed:
        assert streamed.status_code == 200 and [line for line in streamed.iter_lines() if line][-1] == "data: [DONE]"
    spans = _trace_of(live, "POST /v1/completions")
    server, generate = _one(spans, "POST /v1/completions"), _one(spans, "generate")
    assert _child_of(generate, server)
    assert _attrs(generate)[tracing.EXPERT] == "dates-lora" and 0 < _attrs(generate)[tracing.OUTPUT_TOKENS] <= 5
    assert generate.end_time is not None and server.end_time is not None and generate.end_time <= server.end_time


def test_composition_request_continues_the_callers_trace(live: dict[str, Any]) -> None:
    created = _post(
        live,
        "/api/compositions",
        {
            "name": "pair",
            "router": "embedding",
            "router_params": {"threshold": -1.0},
            "experts": ["math-lora", "dates-lora"],
            "k": 2,
            "aggregator": "synthesize",
            "aggregator_params": {"model": "tiny-base"},
        },
    )
    assert created.status_code == 201, created.text
    caller_trace, caller_span = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    traceparent = f"00-{caller_trace:032x}-{caller_span:016x}-01"
    resp = _post(
        live, "/v1/chat/completions", {"model": "pair", "messages": CHAT, "max_tokens": 4}, traceparent=traceparent
    )
    assert resp.status_code == 200, resp.text

    spans = _trace_of(live, "POST /v1/chat/completions", lambda s: s.context.trace_id == caller_trace)
    server = _one(spans, "POST /v1/chat/completions")
    assert server.parent is not None and server.parent.span_id == caller_span and server.parent.is_remote
    resolve, route, aggregate = _one(spans, "resolve"), _one(spans, "route"), _one(spans, "aggregate")
    members = [s for s in spans if s.name == "generate"]
    assert _child_of(resolve, server) and _child_of(route, resolve)
    assert len(members) == 2 and all(_child_of(m, server) for m in members)
    assert _child_of(aggregate, server)
    assert _attrs(resolve)[tracing.MODEL] == "pair" and _attrs(resolve)[tracing.ROUTER] == "embedding"
    routed = _attrs(route)
    assert routed[tracing.COMPOSITION] == "pair" and routed[tracing.ROUTER] == "embedding"
    assert routed[tracing.ROUTE_LEVEL] == "query" and routed[tracing.ROUTE_FALLBACK] is False
    chosen, weights = routed[tracing.ROUTE_EXPERTS], routed[tracing.ROUTE_WEIGHTS]
    assert sorted(chosen) == ["dates-lora", "math-lora"] and len(weights) == 2 and abs(sum(weights) - 1) < 1e-6
    # one span per member, with its own router weight and usage; they ran before the aggregate
    by_expert = {_attrs(m)[tracing.EXPERT]: _attrs(m) for m in members}
    assert set(by_expert) == {"math-lora", "dates-lora"}
    for slug, weight in zip(chosen, weights, strict=True):
        member = by_expert[slug]
        assert member[tracing.WEIGHT] == weight and member[tracing.ENGINE] == "torch"
        assert member[tracing.INPUT_TOKENS] > 0 and member[tracing.OUTPUT_TOKENS] > 0
    assert max(m.end_time or 0 for m in members) <= (aggregate.start_time or 0)
    aggregated = _attrs(aggregate)
    assert aggregated[tracing.AGGREGATOR] == "synthesize" and aggregated[tracing.EXPERT] == "tiny-base"
    assert aggregate.status.status_code != StatusCode.ERROR
    tokens = sum(_attrs(s)[tracing.OUTPUT_TOKENS] for s in [*members, aggregate])
    assert tokens == resp.json()["usage"]["completion_tokens"]  # usage adds up every generation's tokens

    # /api/route: resolve and route, nothing generated
    decided = _post(live, "/api/route", {"model": "pair", "query": "What is 2 + 2?"})
    assert decided.status_code == 200, decided.text
    spans = _trace_of(live, "POST /api/route")
    assert sorted(s.name for s in spans) == ["POST /api/route", "resolve", "route"]
    assert _child_of(_one(spans, "route"), _one(spans, "resolve"))


def test_an_unknown_model_marks_its_span_failed(live: dict[str, Any]) -> None:
    resp = _post(live, "/v1/chat/completions", {"model": "nope", "messages": CHAT})
    assert resp.status_code == 404
    spans = _trace_of(live, "POST /v1/chat/completions")
    server, resolve = _one(spans, "POST /v1/chat/completions"), _one(spans, "resolve")
    assert _child_of(resolve, server) and _attrs(resolve)[tracing.MODEL] == "nope"
    assert resolve.status.status_code == StatusCode.ERROR and "does not exist" in (resolve.status.description or "")
    (event,) = resolve.events
    assert event.name == "exception" and dict(event.attributes or {})["exception.type"] == "core.errors.NotFound"
    # the server span says what the client got; a 4xx is the client's error, not the server's (HTTP conventions)
    assert _status_code(server) == 404 and server.status.status_code != StatusCode.ERROR
    assert not [s for s in spans if s.name == "generate"]


def test_a_failed_member_marks_its_own_span(live: dict[str, Any]) -> None:
    body = {"name": "with-broken", "router": "embedding", "router_params": {"threshold": -1.0}, "k": 2}
    created = _post(live, "/api/compositions", {**body, "experts": ["math-lora", "broken-lora"], "aggregator": "vote"})
    assert created.status_code == 201, created.text
    # broken for real: its adapter weights vanish from the store, so the engine cannot load it
    broken_id = httpx.get(f"{live['url']}/api/experts/broken-lora", headers=live["env"].query).json()["id"]
    (ArtifactStore(live["env"].settings.store_dir).expert_dir(broken_id) / "adapter_model.safetensors").unlink()
    resp = _post(live, "/v1/chat/completions", {"model": "with-broken", "messages": CHAT, "max_tokens": 4})
    assert resp.status_code == 200 and resp.headers["x-moerge-failed"] == "broken-lora"
    spans = _trace_of(live, "POST /v1/chat/completions")
    members = {_attrs(s)[tracing.EXPERT]: s for s in spans if s.name == "generate"}
    assert set(members) == {"math-lora", "broken-lora"}
    failed, answered = members["broken-lora"], members["math-lora"]
    assert failed.status.status_code == StatusCode.ERROR and [e.name for e in failed.events] == ["exception"]
    assert tracing.OUTPUT_TOKENS not in _attrs(failed)
    assert answered.status.status_code != StatusCode.ERROR and _attrs(answered)[tracing.OUTPUT_TOKENS] > 0
    aggregate = _one(spans, "aggregate")
    assert _attrs(aggregate)[tracing.AGGREGATOR] == "vote" and _attrs(aggregate)[tracing.CHOSEN] == ("math-lora",)
    assert aggregate.status.status_code != StatusCode.ERROR
    assert _one(spans, "POST /v1/chat/completions").status.status_code != StatusCode.ERROR


def test_probes_and_other_routes(live: dict[str, Any]) -> None:
    assert httpx.get(f"{live['url']}/api/health", timeout=10).status_code == 200
    got = httpx.get(f"{live['url']}/api/experts/math-lora", headers=live["env"].query, timeout=10)
    assert got.status_code == 200
    # named by the route, not the path (a name per slug would be a name per request)
    spans = _trace_of(live, "GET /api/experts/{ref}")
    assert _attrs(_one(spans, "GET /api/experts/{ref}"))["http.route"] == "/api/experts/{ref}"
    assert not [s for s in live["spans"].get_finished_spans() if "health" in s.name]  # probes are not traced
