"""A generating request whose client hangs up stops generating.

Litestar runs a handler to its end even when the client has gone (it notices a disconnect only while it
streams a response). A generation nobody waits for would keep its vLLM server (or the torch engine) busy up
to ``max_tokens``, so this middleware watches the connection of the routes that generate once their body has
been read: when the client disconnects before the response is complete, the request's task is cancelled.
The cancellation reaches the engine: an HTTP request to vLLM is closed (vLLM aborts the generation), the
torch engine drops the request at its next decode step. Only routes that generate and write nothing are
cancelled: cancelling a registration or a merge submission midway could leave it half-done.
"""

from __future__ import annotations

import asyncio
import logging

from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

log = logging.getLogger("moerge.api")

# POST routes that run a model and write nothing but usage (charged on their own even when cut short).
# The admin panel's playground and an expert card's "try it" box generate too.
GENERATING_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/route", "/admin/playground"}
)


def generates(scope: Scope) -> bool:
    if scope["type"] != "http" or scope.get("method") != "POST":
        return False
    path = str(scope.get("path", "")).rstrip("/")
    return path in GENERATING_PATHS or (path.startswith("/admin/experts/") and path.endswith("/try"))


class CancelOnDisconnectMiddleware:
    """Cancels a generating request (``generates``) whose client disconnects before its response begins; once a
    response streams, Litestar stops the stream on the disconnect this middleware hands on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not generates(scope):
            await self.app(scope, receive, send)
            return
        request_task = asyncio.current_task()
        assert request_task is not None
        gone = asyncio.Event()  # the client disconnected
        started = False  # the response has begun: a streamed one stops itself on a disconnect (Litestar)
        cancelled_by_us = False
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal cancelled_by_us
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            gone.set()
            if not started:
                log.info("client disconnected from %s: stopping its generation", scope.get("path"))
                cancelled_by_us = True
                request_task.cancel()

        async def guarded_receive() -> ReceiveMessage:
            nonlocal watcher
            if watcher is not None:  # the body is read: the watcher owns the connection's messages now
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch(), name="moerge-disconnect-watch")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except asyncio.CancelledError:
            if not cancelled_by_us:
                raise
            # Our own cancellation: the client is gone, there is nobody to answer. Anything else (server
            # shutdown) propagates.
            if request_task.uncancel() > 0:
                raise
        finally:
            started = True
            if watcher is not None:
                watcher.cancel()
