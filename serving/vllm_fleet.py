"""The engine's vLLM servers, one per base: found or recorded on first use (managed, or remote when
``VLLMConfig.remote_servers`` names the base), started on demand within ``max_servers``, health-checked in the
background, and every HTTP exchange with them turned into moerge's errors.

Room for a new server: the least recently used server that is ready, idle and has not served for
``keep_warm_s`` is stopped for it. When none is, the request waits (in arrival order, up to ``server_wait_s``)
until one is or a slot frees, then gets ``EngineUnavailable`` with a Retry-After of when one becomes stoppable.
A server starting every request (round-robin over more bases than ``max_servers``) would cost 30-60 s each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import aiohttp

from core.lora import lora_rank_for
from serving.engine import EngineUnavailable, GenerationFailed, Target
from serving.vllm_adapters import served_rank
from serving.vllm_client import PROBE_ERRORS, VLLMClient
from serving.vllm_config import VLLMConfig
from serving.vllm_server import ADMIN_HINT, ServedSettings, Server, ServerDied, Watch
from serving.vllm_supervisor import Supervisor, observe

log = logging.getLogger(__name__)

T = TypeVar("T")


class Fleet:
    """The servers by base id, with the ``Supervisor`` that runs their processes."""

    def __init__(self, config: VLLMConfig, log_dir: Path) -> None:
        self.config = config
        self.servers: dict[str, Server] = {}
        self.supervisor = Supervisor(config, log_dir, self.servers)
        self._monitor: asyncio.Task[None] | None = None
        # Requests waiting to start a server, first come first served: only the first may take room.
        self._room_queue: deque[object] = deque()
        # Set (and replaced) whenever room may have appeared; a waiter takes the current one before it looks.
        self._room_changed = asyncio.Event()
        self._stopping: set[Server] = set()  # stopped and forgotten, but holding their slot until they exit
        self._resetting: set[Server] = set()  # being stopped to start again with new settings

    def entry(self, base_id: str, base_dir: Path | None, rank: int, settings: ServedSettings | None = None) -> Server:
        """The server of ``base_id``, recorded (not started) if new; ``rank`` raises its next start's rank;
        ``settings`` (chat template, tool parser), if given, are its next start's."""
        server = self.servers.get(base_id)
        if server is None:
            remote_url = self.config.remote_servers.get(base_id)
            if remote_url is not None:
                # Accept an OpenAI-style base URL ending in /v1 as well as the bare server URL.
                url = re.sub(r"/v1/?$", "", remote_url.rstrip("/"))
                server = Server(base_id=base_id, base_dir=None, remote=True, url=url, state="remote")
                server.client = VLLMClient(url, self.config)
            else:
                server = Server(base_id=base_id, base_dir=base_dir, remote=False, model_name=base_id)
                server.notify = self._room_may_have_changed
            self.servers[base_id] = server
            observe(server)
        if not server.remote:
            if base_dir is not None:
                server.base_dir = base_dir
            # Takes effect at the next (re)start; a running server keeps the rank it started with.
            server.rank = max(server.rank, lora_rank_for(max(self.config.max_lora_rank, rank)))
            if settings is not None:
                server.settings = settings
        return server

    async def acquire(self, target: Target, *, wait: bool, force_wait: bool = False) -> Server:
        """The ready server for ``target``'s base, starting it if needed; else ``EngineUnavailable``.

        Waits for a start only if it is the base's first (``wait``) or ``force_wait`` is given; only then does it
        wait (up to ``server_wait_s``) for room to start one, too.
        """
        if self.supervisor.closed:
            raise EngineUnavailable("the vLLM engine is closed", retry_after=5)
        self._ensure_monitor()
        if target.base_id not in self.config.remote_servers:
            served_rank(target.max_lora_rank, target)  # refused before a server is recorded or started
        server = self.entry(
            target.base_id, target.base_dir, target.max_lora_rank, (target.chat_template, target.tool_parser)
        )
        if server.remote:  # its command line is not ours: the settings apply to managed servers only
            if not server.model_name:
                await self._resolve_remote(server)
            return server
        if server in self._resetting:
            raise self.supervisor.unavailable(
                server,
                f"the vLLM server for base {server.base_id!r} is restarting with a new chat template or tool parser",
            )
        if server.state == "ready":
            if server.proc is not None and server.proc.alive:
                if server.settings == server.started_settings:
                    return server
                await self._restart_for_settings(server)  # and started again below, as after any stop
            else:
                self.supervisor.notice_exit(server)  # died, and the exit watcher has not run yet
        if server.state == "dead" and not server.busy_starting:
            await self._launch_when_room(server, self.config.server_wait_s if wait or force_wait else 0.0)
        if server.state == "ready":
            return server
        if server.task is not None and (force_wait or (wait and not server.ever_ready)):
            server.awaiting_start += 1  # not stoppable for room before it has served us
            try:
                # asyncio.wait neither cancels the shared start task on our timeout nor raises its outcome.
                await asyncio.wait({server.task}, timeout=self.config.startup_timeout_s + 30)
            finally:
                server.awaiting_start -= 1
                if server.awaiting_start == 0:
                    server.notify()
            if server.state == "ready":
                return server
        raise self.supervisor.unavailable(server)

    async def _restart_for_settings(self, server: Server) -> None:
        """The base's chat template or tool parser changed in the registry since its server started: stop it once
        idle, so that this request starts it again with the new ones (busy: EngineUnavailable, come back soon)."""
        if server.in_flight > 0:
            raise EngineUnavailable(
                f"the chat template or tool parser of base {server.base_id!r} changed: its vLLM server restarts with "
                f"them once its {server.in_flight} requests in flight are done",
                retry_after=5,
            )
        log.info("restarting vLLM for %s: its chat template or tool parser changed", server.base_id)
        self._resetting.add(server)  # other requests meanwhile: EngineUnavailable, not a second stop or start
        try:
            await self.supervisor.stop(server)
        finally:
            server.stopping = False  # stopped to start again, not for good
            self._resetting.discard(server)

    async def call(self, server: Server, watch: Watch, aw: Awaitable[T]) -> T:
        """Await ``aw`` (an HTTP exchange with ``server``), turning failures into moerge errors."""
        try:
            return await watch.run(aw)
        except ServerDied:
            # The log tail goes to status()/last_error (admin view); here only where to look.
            raise GenerationFailed(
                f"the vLLM server for {server.base_id!r} died during the request; it is being restarted; {ADMIN_HINT}"
            ) from None
        except aiohttp.ClientConnectorError as exc:  # refused: nothing listens on its port
            raise self._cannot_connect(server, exc, refused=True) from exc
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError, which it is too
            raise self._cannot_connect(server, exc, refused=False) from exc
        except TimeoutError as exc:  # aiohttp's read timeouts are TimeoutErrors
            raise GenerationFailed(
                f"the vLLM server for {server.base_id!r} gave no answer within {self.config.request_timeout_s:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            await self.supervisor.confirm_exit(server)
            log.warning("vLLM for %s: connection to %s failed mid-request: %r", server.base_id, server.url, exc)
            raise GenerationFailed(
                f"connection to the vLLM server for {server.base_id!r} failed mid-request: {type(exc).__name__}"
            ) from exc

    def _cannot_connect(self, server: Server, exc: Exception, *, refused: bool) -> EngineUnavailable:
        self.supervisor.notice_exit(server, refused=refused)
        log.warning("vLLM for %s: cannot connect to %s: %s", server.base_id, server.url, exc)
        return self.supervisor.unavailable(server, f"cannot connect to the vLLM server for {server.base_id!r}")

    async def _launch_when_room(self, newcomer: Server, wait_s: float) -> None:
        """Launch ``newcomer`` once it fits under ``max_servers``, stopping a stoppable server for it if need be;
        waits for room in arrival order, up to ``wait_s``, then raises ``EngineUnavailable``."""
        deadline = time.monotonic() + wait_s
        turn = object()
        self._room_queue.append(turn)
        try:
            while True:
                changed = self._room_changed  # taken before looking: a change after the look still wakes us
                if self.supervisor.closed:
                    raise EngineUnavailable("the vLLM engine is closed", retry_after=5)
                if newcomer.state != "dead" or newcomer.busy_starting:
                    return  # another request for this base started it meanwhile
                if self.servers.get(newcomer.base_id) is not newcomer:
                    raise EngineUnavailable(f"the vLLM server for {newcomer.base_id!r} was stopped", retry_after=1)
                first = self._room_queue[0] is turn
                now = time.monotonic()
                running = self._slot_holders(newcomer)
                if first:
                    if len(running) < self.config.max_servers:
                        # No await between the count and the launch: the slot is ours before anyone else looks.
                        self.supervisor.launch(newcomer)
                        return
                    stoppable = [
                        s
                        for s in running
                        if s not in self._stopping and self._idle(s) and self._stoppable_in(s, now) == 0
                    ]
                    if stoppable:
                        victim = min(stoppable, key=lambda s: s.last_used)
                        log.info(
                            "stopping the vLLM server for %s (idle for %.0f s, least recently used) to start %s",
                            victim.base_id,
                            now - victim.last_used,
                            newcomer.base_id,
                        )
                        # Shielded: a waiter giving up must not leave a server half stopped.
                        await asyncio.shield(self.stop_server(victim.base_id))
                        continue
                if now >= deadline:
                    raise self._no_room(newcomer, now, wait_s)
                timeout = deadline - now
                if first:  # wake when the next idle server's keep-warm ends, if before the deadline
                    soonest = [self._stoppable_in(s, now) for s in running if s not in self._stopping and self._idle(s)]
                    timeout = min([timeout, *soonest])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=timeout)
        finally:
            self._room_queue.remove(turn)
            self._room_may_have_changed()  # the next in line looks now

    def _slot_holders(self, newcomer: Server) -> list[Server]:
        """The managed servers counted against ``max_servers``: running, starting, or still exiting."""
        live = [
            s
            for s in self.servers.values()
            if s is not newcomer and not s.remote and (s.state != "dead" or s.busy_starting)
        ]
        return live + list(self._stopping)

    @staticmethod
    def _idle(server: Server) -> bool:
        return server.state == "ready" and server.in_flight == 0 and server.awaiting_start == 0

    def _stoppable_in(self, server: Server, now: float) -> float:
        """Seconds until ``server`` may be stopped to make room (0: now; already stopping counts as 0). A busy or
        starting server is kept warm for ``keep_warm_s`` after it is done, so that is the least it has left."""
        if server in self._stopping:
            return 0.0
        if not self._idle(server):
            return self.config.keep_warm_s
        return max(0.0, server.last_used + self.config.keep_warm_s - now)

    def _no_room(self, newcomer: Server, now: float, wait_s: float) -> EngineUnavailable:
        running = self._slot_holders(newcomer)
        soonest = min((self._stoppable_in(s, now) for s in running), default=0.0)
        waited = f" within {wait_s:g} s" if wait_s > 0 else ""
        return EngineUnavailable(
            f"no room to start the vLLM server for {newcomer.base_id!r}{waited}: all {self.config.max_servers} "
            f"servers (max_servers) are busy or served within the last {self.config.keep_warm_s:g} s (keep-warm)",
            retry_after=max(1, math.ceil(soonest)),
        )

    def _room_may_have_changed(self) -> None:
        """Wake every request waiting for room (each looks again; only the first in line takes it)."""
        self._room_changed.set()
        self._room_changed = asyncio.Event()

    async def _resolve_remote(self, server: Server) -> None:
        """Find the base's name on a remote server: ``base_id`` if served, else its only base model."""
        try:
            models = await server.http.models(timeout_s=10)
        except PROBE_ERRORS as exc:
            server.reachable = False
            observe(server)
            log.warning("the remote vLLM server for %s at %s is unreachable: %r", server.base_id, server.url, exc)
            raise EngineUnavailable(
                f"the remote vLLM server for {server.base_id!r} is unreachable; {ADMIN_HINT}",
                retry_after=max(1, math.ceil(self.config.health_interval_s)),
            ) from exc
        server.reachable = True
        observe(server)
        roots = [m.get("id") for m in models if not m.get("parent")]
        if server.base_id in roots:
            server.model_name = server.base_id
        elif len(roots) == 1:
            server.model_name = roots[0]
        else:
            log.warning("the vLLM server at %s serves %s, none named %s", server.url, roots, server.base_id)
            raise GenerationFailed(
                f"the remote vLLM server for {server.base_id!r} serves several models, none named so; {ADMIN_HINT}",
                param="model",
            )

    async def stop_server(self, base_id: str) -> None:
        """Forget ``base_id``'s server and stop it; the next request for the base starts a new one."""
        server = self.servers.pop(base_id, None)
        if server is None or server.remote:
            if server is not None:
                await self.supervisor.stop(server)
            return
        self._stopping.add(server)  # its slot stays taken until its process has exited
        try:
            await self.supervisor.stop(server)
        finally:
            self._stopping.discard(server)
            self._room_may_have_changed()

    async def close(self) -> None:
        """Stop the health checks and every server; nothing starts afterwards."""
        self.supervisor.closed = True
        self._room_may_have_changed()  # requests waiting for room fail now
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        await asyncio.gather(*(self.supervisor.stop(s) for s in self.servers.values()), return_exceptions=True)

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="vllm-health")

    async def _monitor_loop(self) -> None:
        while not self.supervisor.closed:
            await asyncio.sleep(self.config.health_interval_s)
            servers = list(self.servers.values())
            await asyncio.gather(*(self.supervisor.check(s) for s in servers), return_exceptions=True)
