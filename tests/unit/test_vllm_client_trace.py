"""The generations moerge sends to a vLLM server carry the active span's trace context (W3C ``traceparent``), so a
vLLM server with ``--otlp-traces-endpoint`` joins moerge's trace: checked against a real aiohttp server in
process that records each request's headers. The span comes from a provider of the test's own (not installed
globally): propagation reads the current context, whoever made the span."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from serving.vllm_client import VLLMClient
from serving.vllm_config import VLLMConfig


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A server answering a chat completion, a stream and /health; yields its URL and each request's headers."""
    seen: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"choices": [{"message": {"content": "hi"}}]})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        return response

    async def health(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_requests_carry_the_active_trace(server: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = server
    client = VLLMClient(url, VLLMConfig())
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("generate") as span:
            reply = await client.post_json("/v1/chat/completions", {"messages": []})
            stream = await client.open_stream("/v1/chat/completions", {"messages": [], "stream": True})
            assert await stream.next_event() == {"choices": []} and await stream.next_event() is None
            stream.close()
            assert await client.healthy(timeout_s=5)
        assert reply.status_code == 200
        context = span.get_span_context()
        *generations, probe = seen
        assert len(generations) == 2 and "traceparent" not in probe  # probes belong to no request
        for headers in generations:
            version, trace_id, parent_id, flags = headers["traceparent"].split("-")
            assert version == "00" and int(flags, 16) & 1  # sampled
            assert int(trace_id, 16) == context.trace_id and int(parent_id, 16) == context.span_id

        # outside any span (as with tracing off) nothing is added
        seen.clear()
        await client.post_json("/v1/chat/completions", {"messages": []})
        assert len(seen) == 1 and "traceparent" not in seen[0]
    finally:
        await client.close()
