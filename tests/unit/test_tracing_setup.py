"""core/tracing.py: the OTLP exporter the environment asks for, checked by what real OTLP receivers in process
get (an HTTP one for http/protobuf, a gRPC one for grpc); installing it once per process (in a child process,
since the global provider can be set only once); nothing installed when no endpoint is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from core import tracing

REPO = Path(__file__).resolve().parents[2]


class Received:
    """What a receiver got: one export request (decoded) and its headers per call."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []

    def spans(self) -> list[tuple[str, str]]:
        """(service.name, span name) of every span received."""
        out: list[tuple[str, str]] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    out.extend((attributes.get("service.name", ""), s.name) for s in scope_spans.spans)
        return out


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver (protobuf bodies) on a free port."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.paths.append(self.path)
            received.headers.append({k.lower(): v for k, v in self.headers.items()})
            received.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* variable from the outer environment."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_no_endpoint_no_provider(otel_env: pytest.MonkeyPatch) -> None:
    assert not tracing.otlp_enabled() and tracing.make_provider() is None
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.make_provider() is None


def test_http_export_honours_the_sdks_variables(
    otel_env: pytest.MonkeyPatch, http_receiver: tuple[str, Received]
) -> None:
    url, received = http_receiver
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    otel_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=ml")
    provider = tracing.make_provider()
    assert provider is not None
    with provider.get_tracer("test").start_as_current_span("hello"):
        pass
    assert provider.force_flush(10_000)
    provider.shutdown()
    assert received.paths == ["/v1/traces"] and received.headers[0]["x-team"] == "ml"
    assert received.spans() == [("moerge", "hello")]  # moerge's default service name

    otel_env.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    provider = tracing.make_provider()
    assert provider is not None
    with provider.get_tracer("test").start_as_current_span("again"):
        pass
    provider.shutdown()  # flushes
    assert received.spans()[-1] == ("gateway-eu", "again")


def test_grpc_export(otel_env: pytest.MonkeyPatch) -> None:
    received = Received()

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # the service's method name
            received.requests.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        provider = tracing.make_provider()
        assert provider is not None
        with provider.get_tracer("test").start_as_current_span("over-grpc"):
            pass
        provider.shutdown()
        assert received.spans() == [("moerge", "over-grpc")]
    finally:
        server.stop(None)

    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing.make_provider()


CHILD = """
import json, os
from opentelemetry import trace
from api.app import create_app
from core import tracing
from core.settings import Settings

def has_plugin(app):
    from litestar.plugins.opentelemetry import OpenTelemetryPlugin
    return any(isinstance(p, OpenTelemetryPlugin) for p in app.plugins)

settings = Settings.from_env({"MOERGE_HOME": os.environ["HOME_DIR"]})
off = create_app(settings)
out = {"off_plugin": has_plugin(off), "off_provider": type(trace.get_tracer_provider()).__name__}
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = os.environ["RECEIVER"]
on = create_app(settings)  # sets tracing up
out["installed"] = tracing.setup_tracing() is not None and tracing.setup_tracing() is trace.get_tracer_provider()
out["on_plugin"] = has_plugin(on)
with tracing.tracer.start_as_current_span("from-the-child"):  # the module's tracer, made before the install
    pass
tracing.shutdown_tracing()  # exports what is queued
print(json.dumps(out))
"""


def test_setup_installs_once_and_shutdown_flushes(
    otel_env: pytest.MonkeyPatch, http_receiver: tuple[str, Received], tmp_path: Path
) -> None:
    url, received = http_receiver
    env = {**os.environ, "RECEIVER": url, "HOME_DIR": str(tmp_path)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    # tracing off: no provider, no server-span middleware
    assert out["off_plugin"] is False and out["off_provider"] == "ProxyTracerProvider"
    assert out["installed"] is True and out["on_plugin"] is True
    assert received.spans() == [("moerge", "from-the-child")]
