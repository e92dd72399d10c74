"""OpenTelemetry tracing, set up in one place.

Spans are made through the OpenTelemetry API (``tracer``). They go anywhere only once an SDK ``TracerProvider``
is installed: ``setup_tracing`` installs one exporting by OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set. Otherwise the API's no-op tracer answers (a span costs about a
microsecond and nothing is recorded) and the app installs no server-span middleware at all.

The SDK reads its own ``OTEL_*`` variables (service name and resource attributes, exporter headers, timeout and
certificate, sampler, batch sizes); this module reads only what the SDK leaves to its caller: whether to export,
over which protocol, and moerge's default service name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

SERVICE_NAME = "moerge"  # service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name another
PROTOCOLS = ("http/protobuf", "grpc")  # OTEL_EXPORTER_OTLP_PROTOCOL; the specification's default first

# A ProxyTracer: it answers with the no-op tracer until a provider is installed, then with that provider's.
tracer = trace.get_tracer("moerge")

# Attributes of moerge's spans (never a prompt or an answer: only names, numbers and choices).
MODEL = "moerge.model"  # resolve: the name asked for
COMPOSITION = "moerge.composition"  # route
ROUTER = "moerge.router"  # resolve, route
ROUTE_LEVEL = "moerge.route.level"  # route: "query" or "token"
ROUTE_EXPERTS = "moerge.route.experts"  # route: the chosen experts ...
ROUTE_WEIGHTS = "moerge.route.weights"  # ... and their weights
ROUTE_FALLBACK = "moerge.route.fallback"  # route: no candidate fitted, the fallback answers
EXPERT = "moerge.expert"  # generate, aggregate: the slug a generation runs (a mixture: its composition)
EXPERTS = "moerge.experts"  # resolve: what answers; generate (logit fusion): the experts decoding together
ENGINE = "moerge.engine"  # generate, aggregate: "vllm" or "torch"
WEIGHT = "moerge.weight"  # generate: a member's router weight
AGGREGATOR = "moerge.aggregator"  # aggregate
CHOSEN = "moerge.aggregate.chosen"  # aggregate: the experts the final answer came from
INPUT_TOKENS = "gen_ai.usage.input_tokens"  # OpenTelemetry's GenAI semantic conventions
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

_installed: TracerProvider | None = None


def otlp_enabled() -> bool:
    """Whether the environment asks for OTLP export (an endpoint is set and the SDK is not disabled)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def make_provider() -> TracerProvider | None:
    """A TracerProvider batching spans to an OTLP exporter, as the environment asks; None when it asks for none.
    Not installed: ``setup_tracing`` does that."""
    if not otlp_enabled():
        return None
    # The SDK and exporters are imported only when tracing is on (they cost start-up time otherwise).
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    env = os.environ
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or PROTOCOLS[0]
    ).strip()
    exporter: SpanExporter
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        exporter = HTTPExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*
    elif protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

        exporter = GRPCExporter()
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):  # neither names one
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    return provider


def tracing_active() -> bool:
    """Whether some tracer provider is installed in this process (ours, a test's, opentelemetry-instrument's)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def setup_tracing() -> TracerProvider | None:
    """Install ``make_provider``'s provider as this process's, once; returns the provider moerge installed (None:
    tracing is off, or another provider was installed first, which is then kept). Idempotent."""
    global _installed
    if _installed is None and not tracing_active():
        provider = make_provider()
        if provider is not None:
            trace.set_tracer_provider(provider)
            _installed = provider
    return _installed


def shutdown_tracing() -> None:
    """Export the spans still queued and stop the provider ``setup_tracing`` installed (at process exit)."""
    global _installed
    if _installed is not None:
        _installed.shutdown()
        _installed = None


def record_failure(span: Span, exc: BaseException, description: str) -> None:
    """``exc`` on ``span`` as an exception event, and the span's status an error saying ``description``: for a
    failure that is returned rather than raised (a composition member's)."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(StatusCode.ERROR, description)
