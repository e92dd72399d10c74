"""The engine's vLLM servers, one per base: found or recorded on first use (managed, or remote when
``VLLMConfig.remote_servers`` names the base), started on demand within ``max_servers`` (stopping the least
recently used idle one), health-checked in the background, and every HTTP exchange with them turned into
moerge's errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import aiohttp

from core.lora import lora_rank_for
from serving.engine import EngineUnavailable, GenerationFailed, Target
from serving.vllm_adapters import served_rank
from serving.vllm_client import PROBE_ERRORS, VLLMClient
from serving.vllm_config import VLLMConfig
from serving.vllm_server import ADMIN_HINT, Server, ServerDied, Watch
from serving.vllm_supervisor import Supervisor

log = logging.getLogger(__name__)

T = TypeVar("T")


class Fleet:
    """The servers by base id, with the ``Supervisor`` that runs their processes."""

    def __init__(self, config: VLLMConfig, log_dir: Path) -> None:
        self.config = config
        self.servers: dict[str, Server] = {}
        self.supervisor = Supervisor(config, log_dir, self.servers)
        self._monitor: asyncio.Task[None] | None = None

    def entry(self, base_id: str, base_dir: Path | None, rank: int) -> Server:
        """The server of ``base_id``, recorded (not started) if new; ``rank`` raises its next start's rank."""
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
            self.servers[base_id] = server
        if not server.remote:
            if base_dir is not None:
                server.base_dir = base_dir
            # Takes effect at the next (re)start; a running server keeps the rank it started with.
            server.rank = max(server.rank, lora_rank_for(max(self.config.max_lora_rank, rank)))
        return server

    async def acquire(self, target: Target, *, wait: bool, force_wait: bool = False) -> Server:
        """The ready server for ``target``'s base, starting it if needed; else ``EngineUnavailable``.

        Waits for a start only if it is the base's first (``wait``) or ``force_wait`` is given.
        """
        if self.supervisor.closed:
            raise EngineUnavailable("the vLLM engine is closed", retry_after=5)
        self._ensure_monitor()
        if target.base_id not in self.config.remote_servers:
            served_rank(target.max_lora_rank, target)  # refused before a server is recorded or started
        server = self.entry(target.base_id, target.base_dir, target.max_lora_rank)
        if server.remote:
            if not server.model_name:
                await self._resolve_remote(server)
            return server
        if server.state == "ready":
            if server.proc is not None and server.proc.alive:
                return server
            self.supervisor.notice_exit(server)  # died, and the exit watcher has not run yet
        if server.state == "dead" and not server.busy_starting:
            await self._make_room(server)
        async with server.start_lock:  # concurrent first requests start one process
            if server.state == "dead" and not server.busy_starting:
                self.supervisor.launch(server)
        if server.state == "ready":
            return server
        if server.task is not None and (force_wait or (wait and not server.ever_ready)):
            # asyncio.wait neither cancels the shared start task on our timeout nor raises its outcome.
            await asyncio.wait({server.task}, timeout=self.config.startup_timeout_s + 30)
            if server.state == "ready":
                return server
        raise self.supervisor.unavailable(server)

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

    async def _make_room(self, newcomer: Server) -> None:
        """Stop least recently used idle servers until ``newcomer`` fits under ``max_servers``."""
        while True:
            running = [
                s
                for s in self.servers.values()
                if s is not newcomer and not s.remote and (s.state != "dead" or s.busy_starting)
            ]
            if len(running) < self.config.max_servers:
                return
            idle = [s for s in running if s.state == "ready" and s.in_flight == 0]
            if not idle:
                raise EngineUnavailable(
                    f"all {self.config.max_servers} vLLM servers are busy (max_servers); retry shortly",
                    retry_after=5,
                )
            victim = min(idle, key=lambda s: s.last_used)
            log.info(
                "stopping the vLLM server for %s (least recently used) to start %s", victim.base_id, newcomer.base_id
            )
            await self.stop_server(victim.base_id)

    async def _resolve_remote(self, server: Server) -> None:
        """Find the base's name on a remote server: ``base_id`` if served, else its only base model."""
        try:
            models = await server.http.models(timeout_s=10)
        except PROBE_ERRORS as exc:
            server.reachable = False
            log.warning("the remote vLLM server for %s at %s is unreachable: %r", server.base_id, server.url, exc)
            raise EngineUnavailable(
                f"the remote vLLM server for {server.base_id!r} is unreachable; {ADMIN_HINT}",
                retry_after=max(1, math.ceil(self.config.health_interval_s)),
            ) from exc
        server.reachable = True
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
        if server is not None:
            await self.supervisor.stop(server)

    async def close(self) -> None:
        """Stop the health checks and every server; nothing starts afterwards."""
        self.supervisor.closed = True
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
