"""Readiness and a graceful stop for one replica of the API.

A replica is ``starting`` until the app's lifespan has finished (database migrated, store checked, engine
and worker up), then ``ready``; SIGTERM (or Ctrl-C) makes it ``draining`` at once. While it drains,
``/api/ready`` answers 503 so a load balancer stops sending traffic, every new request but ``/api/health``
and ``/api/ready`` gets a 503 in the OpenAI error shape (``code: "draining"``, ``Retry-After``), and the
requests already in flight, streams included, get up to ``MOERGE_DRAIN_S`` to finish. Then the server stops
as uvicorn always does (the app's lifespan stops its in-process worker, which re-queues its job).

:class:`Drain` is the state (on ``app.state.drain``), :class:`DrainMiddleware` counts and refuses requests,
:class:`DrainingServer` is the uvicorn server `moerge serve` runs: it turns the first signal into a drain.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Literal

import msgspec
import uvicorn
from litestar import Litestar
from litestar.datastructures import State
from litestar.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

from api.exceptions import error_body

log = logging.getLogger("moerge.api")

Phase = Literal["starting", "ready", "draining"]
# Always answered, draining or not, and not counted as in flight: a probe must see the drain, not a 503 of it.
PROBES = frozenset({"/api/health", "/api/ready"})
RETRY_AFTER_S = 1  # another replica can take the request now


class Drain:
    """One replica's phase and the requests it has in flight."""

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self.phase: Phase = "starting"
        self.in_flight = 0
        self.deadline: float | None = None  # time.monotonic() the drain stops waiting at

    @property
    def draining(self) -> bool:
        return self.phase == "draining"

    def begin(self) -> None:
        """Stop taking requests; the ones in flight have ``bound_s`` from now. Called from a signal handler:
        it only sets attributes."""
        if self.phase != "draining":
            self.phase = "draining"
            self.deadline = time.monotonic() + self.bound_s

    def finished(self) -> bool:
        """Draining, and nothing is in flight any more or the bound has passed."""
        if self.deadline is None:
            return False
        return self.in_flight <= 0 or time.monotonic() >= self.deadline

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        """The app's last lifespan: the ones before it have started everything when it runs."""
        if self.phase == "starting":
            self.phase = "ready"
        try:
            yield
        finally:
            self.begin()  # stopping without a signal (a test's server, the demo's thread) is a drain too


def drain_of(state: State) -> Drain:
    return state.drain  # type: ignore[no-any-return]


_REFUSAL = msgspec.json.encode(
    error_body(
        "this server is shutting down: send the request again (another replica takes it)",
        type_="server_error",
        param=None,
        code="draining",
    )
)


class DrainMiddleware:
    """The app's outermost middleware: counts the requests in flight; while draining, refuses new ones."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") in PROBES:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_REFUSAL)).encode()),
                        (b"retry-after", str(RETRY_AFTER_S).encode()),
                        (b"connection", b"close"),  # the client's next request goes to a fresh connection elsewhere
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _REFUSAL, "more_body": False})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM or SIGINT drains (see the module) before uvicorn's own
    shutdown runs; a second signal stops waiting, and one more Ctrl-C after that forces (skips the app's
    shutdown), as a second does in uvicorn. The process then exits 0: the signal was handled, not re-raised."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.started or self.drain.draining:  # still starting, or asked twice: stop now
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.drain.draining:
            return False
        if not self._announced:  # logged here, not in the signal handler
            self._announced = True
            log.warning(
                "draining: %d request(s) in flight, waiting up to %ss", self.drain.in_flight, self.drain.bound_s
            )
        if self.drain.finished():
            if self.drain.in_flight > 0:
                log.warning("drain bound reached with %d request(s) still in flight", self.drain.in_flight)
            return True
        return False


def serve(app: Litestar, **config: Any) -> None:
    """Run ``app`` (made by ``create_app``) with :class:`DrainingServer` until it has drained."""
    # After the drain, uvicorn waits for the connections left (a request past the bound) this long at most.
    config.setdefault("timeout_graceful_shutdown", 2)
    server = DrainingServer(uvicorn.Config(app, **config), drain_of(app.state))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run exits
