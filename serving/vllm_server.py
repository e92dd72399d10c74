"""What moerge knows about one vLLM server (``Server``: state, process, client, loaded adapters), and ``Watch``,
which races every await of a request against that server's death so nothing waits on a dead server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from serving.vllm_client import VLLMClient
from serving.vllm_process import VLLMProcess

T = TypeVar("T")
ServerState = Literal["starting", "ready", "dead", "remote"]
ServedSettings = tuple[str | None, str | None]  # (chat template text, tool parser) of a managed server

# Errors to callers name the base and this, never a path, URL or log line: those go to moerge's log and to the
# admin-only view of the server (its last_error, log path and pid).
ADMIN_HINT = "an admin can read why with GET /api/engines (admin key) or in moerge's log"


@dataclass(eq=False)
class Server:
    """One base's vLLM server: managed (a process moerge starts and restarts) or remote (a URL)."""

    base_id: str
    base_dir: Path | None
    remote: bool
    url: str = ""
    model_name: str = ""  # the base's name on the server (--served-model-name)
    rank: int = 0  # --max-lora-rank for the next (re)start
    state: ServerState = "dead"
    proc: VLLMProcess | None = None
    port: int | None = None
    epoch: int = 0  # bumped at each (re)start: an adapter load answered by an older process does not count
    adapters: dict[str, str] = field(default_factory=dict)  # adapter id -> path loaded on the current process
    adapter_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    restarts: int = 0
    ever_ready: bool = False
    # Set when the current process exits; replaced at each start, so it fails only that process's requests.
    died: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Any] | None = None  # the start or restart loop in progress
    started_at: float = 0.0
    startup_s: float | None = None
    next_attempt_at: float = 0.0
    health_failures: int = 0
    reachable: bool | None = None  # remote servers: last health check
    last_error: str | None = None
    stopping: bool = False
    client: VLLMClient | None = None  # HTTP to the current process (made when its URL is known)
    in_flight: int = 0  # requests using it now (an idle server may be stopped to make room)
    awaiting_start: int = 0  # requests waiting for its start to end: it is theirs, not room for another base
    started_rank: int = 0  # --max-lora-rank of the running process
    # The base's chat template (Jinja text; None: the model's own) and vLLM tool-call parser for the next (re)start,
    # as the latest request's Target gives them, and those the running process started with: when they differ,
    # the fleet restarts the server once it is idle (a registry change reaches the next request).
    settings: ServedSettings = (None, None)
    started_settings: ServedSettings = (None, None)
    # time.monotonic() at the end of its last request, or when it became ready: it is kept warm for
    # VLLMConfig.keep_warm_s after this.
    last_used: float = 0.0
    # Set by the fleet: called when this server may have become stoppable or left its slot, so requests waiting
    # for room look again.
    notify: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def http(self) -> VLLMClient:
        """The client of a server that has a URL (every ready or remote one)."""
        if self.client is None:
            raise RuntimeError(f"the vLLM server for {self.base_id!r} has no URL yet")
        return self.client

    def drop_connections(self) -> asyncio.Task[None] | None:
        """Forget the current process's connections (it died or is stopping); returns the closing task."""
        return None if self.client is None else self.client.drop()

    @property
    def busy_starting(self) -> bool:
        return self.task is not None and not self.task.done()

    def unavailable_message(self) -> str:
        """Why this server cannot answer, for any caller: its state, and after a failure where an admin reads why
        (``last_error`` holds the reason and the log tail, for the admin view only)."""
        if self.state == "dead" and self.last_error and self.last_error.startswith("start failed"):
            return f"the vLLM server for base {self.base_id!r} failed to start; {ADMIN_HINT}"
        what = f"the vLLM server for base {self.base_id!r} is {self.state}"
        if self.last_error and self.last_error != "stopped":
            what += f" after a failure; {ADMIN_HINT}"
        return what


class ServerDied(Exception):
    """Internal: the server died while a request was waiting on it."""


class Watch:
    """One request on ``server``: counts it in flight (``close`` when done) and races each of its awaits against
    the server's death."""

    def __init__(self, server: Server) -> None:
        self.died = server.died
        self._waiter: asyncio.Future[Any] | None = None
        self._server: Server | None = server
        server.in_flight += 1
        server.last_used = time.monotonic()

    async def run(self, aw: Awaitable[T]) -> T:
        """``aw``'s result, or ``ServerDied`` as soon as the server dies (``aw`` is then cancelled)."""
        if self.died.is_set():
            raise ServerDied
        if self._waiter is None:  # one waiter per request, not per stream chunk
            self._waiter = asyncio.ensure_future(self.died.wait())
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task, self._waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        raise ServerDied

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()
        if self._server is not None:
            self._server.in_flight -= 1
            self._server.last_used = time.monotonic()  # warm from the end of its last request, not the start
            if self._server.in_flight == 0:
                self._server.notify()
            self._server = None
