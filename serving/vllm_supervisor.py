"""Supervision of managed vLLM server processes: start one and wait until it is healthy, notice its exit (at once
through a pidfd, or when its port refuses, or after failed health checks), fail its in-flight requests, restart
it in the background with backoff, and stop it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from core import metrics
from serving.engine import EngineUnavailable
from serving.vllm_client import PROBE_ERRORS, VLLMClient
from serving.vllm_config import VLLMConfig, child_env
from serving.vllm_process import VLLMProcess, pick_port, port_is_free, server_command
from serving.vllm_server import Server

log = logging.getLogger(__name__)

# Used for retry_after before a server has ever started here (measured: 30-50 s on 2 cores).
_DEFAULT_STARTUP_S = 60.0
_ERROR_TAIL_CHARS = 1500  # of the server log, in last_error (admin view): enough for the end of a traceback
_ERROR_TAIL_LINES = 15


STARTING_REPORT_S = 10.0


def observe(server: Server) -> None:
    """``server``'s state into the metrics (moerge_vllm_server_state); a remote one is unreachable after a failed
    check."""
    state = "unreachable" if server.remote and server.reachable is False else server.state
    metrics.server_state(server.base_id, state)


class Supervisor:
    """Runs the processes of ``servers`` (the engine's, by base id; read here for the ports in use)."""

    def __init__(self, config: VLLMConfig, log_dir: Path, servers: Mapping[str, Server]) -> None:
        self.config = config
        self.log_dir = log_dir
        self.closed = False  # the engine is closing: nothing restarts any more
        self._servers = servers

    def log_path(self, server: Server) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", server.base_id)
        return self.log_dir / f"vllm-{safe}.log"

    def unavailable(self, server: Server, detail: str | None = None) -> EngineUnavailable:
        """``server`` cannot answer now: the error, with a retry_after from when it should be back."""
        now = time.monotonic()
        expected = server.startup_s or _DEFAULT_STARTUP_S
        if server.remote:
            retry = self.config.health_interval_s
        elif server.state == "starting":
            retry = expected - (now - server.started_at)
        elif server.busy_starting:  # waiting out a backoff before the next restart attempt
            retry = max(0.0, server.next_attempt_at - now) + expected
        else:
            retry = 1.0  # dead and idle: the next request starts it
        return EngineUnavailable(detail or server.unavailable_message(), retry_after=max(1, math.ceil(retry)))

    # ------------------------------------------------------------------ starting

    def launch(self, server: Server) -> None:
        """Start ``server`` in the background (``server.task``); it is "starting" from now."""
        server.state = "starting"
        server.started_at = time.monotonic()
        server.task = asyncio.create_task(self.start(server), name=f"vllm-start-{server.base_id}")

    async def start(self, server: Server) -> bool:
        """Start a process for ``server`` and wait until it is healthy. Never raises; False on failure."""
        server.state = "starting"  # started_at was set by the caller (the wait before a restart counts)
        observe(server)
        server.epoch += 1
        server.adapters.clear()
        server.died = asyncio.Event()
        server.health_failures = 0
        if server.client is not None:  # the previous process's (or a failed start's) connections
            await server.client.close()
        proc: VLLMProcess | None = None
        try:
            if server.base_dir is None:
                raise RuntimeError("no base model folder")
            proc = self._new_process(server, server.base_dir)
            proc.start()
            server.proc = proc
            started_proc = proc
            proc.watch(asyncio.get_running_loop(), lambda: self.declare_dead(server, started_proc))
            log.info("starting vLLM for %s on %s (pid %s, log %s)", server.base_id, server.url, proc.pid, proc.log_path)
            error = await self._wait_healthy(server, proc)
        except asyncio.CancelledError:
            if proc is not None:
                proc.forget()
                proc.signal_group(signal.SIGKILL)
            raise
        except Exception as exc:  # bad folder, no free port, cannot exec: report like a failed start
            error = f"{type(exc).__name__}: {exc}"
        return await self._started(server, proc, error)

    def _new_process(self, server: Server, base_dir: Path) -> VLLMProcess:
        """The process to start for ``server``, on a free port (its last one if it can), with a client for it."""
        cfg = self.config
        avoid = {s.port for s in self._servers.values() if s is not server and s.port is not None}
        port = pick_port(cfg.host, cfg.port_start, prefer=server.port, avoid=avoid)
        server.port, server.url = port, f"http://{cfg.host}:{port}"
        server.client = VLLMClient(server.url, cfg)
        server.started_rank = server.rank
        server.started_settings = template, parser = server.settings
        template_file = None
        if template is not None:  # beside the server's log; rewritten at each start
            template_file = self.log_path(server).with_suffix(".chat_template.jinja")
            template_file.parent.mkdir(parents=True, exist_ok=True)
            template_file.write_text(template, encoding="utf-8")
        command = server_command(
            model_dir=base_dir,
            served_name=server.model_name,
            port=port,
            host=cfg.host,
            max_lora_rank=server.rank,
            max_loras=cfg.max_loras,
            max_model_len=cfg.max_model_len,
            dtype=cfg.dtype,
            chat_template=template_file,
            tool_parser=parser,
            compact_json=cfg.compact_json,
            extra_args=cfg.extra_args,
        )
        return VLLMProcess(command, child_env(cfg), self.log_path(server))

    async def _started(self, server: Server, proc: VLLMProcess | None, error: str | None) -> bool:
        """Record how a start ended (``error`` None: healthy); a failed one's process is terminated."""
        if error is None and not server.stopping:
            server.state = "ready"
            server.ever_ready = True
            server.startup_s = time.monotonic() - server.started_at
            server.last_used = time.monotonic()  # kept warm for the requests it was started for
            server.last_error = None
            log.info("vLLM for %s ready in %.1f s", server.base_id, server.startup_s)
            metrics.VLLM_SERVER_STARTS.labels(base=server.base_id, outcome="ready").inc()
            observe(server)
            return True
        server.state = "dead"
        metrics.VLLM_SERVER_STARTS.labels(base=server.base_id, outcome="failed").inc()
        observe(server)
        server.last_error = f"start failed: {error}" if error else "stopped"
        if proc is not None:
            server.last_error += _tail_suffix(proc, self.log_path(server))
            await asyncio.to_thread(proc.terminate, 5.0)
        log.error("vLLM for %s did not start: %s", server.base_id, server.last_error)
        server.notify()  # dead: its slot is free
        return False

    async def _wait_healthy(self, server: Server, proc: VLLMProcess) -> str | None:
        """None once /health is 200 and /v1/models lists the base; else why not (exit, timeout)."""
        deadline = server.started_at + self.config.startup_timeout_s
        client = server.http
        said = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() - said >= STARTING_REPORT_S:  # a line every few seconds: starting, not hung
                said = time.monotonic()
                waited = said - server.started_at
                log.info("vLLM for %s: waiting for readiness, %.0f s of at most %g s", server.base_id, waited,
                         self.config.startup_timeout_s)  # fmt: skip
            if not proc.alive:
                return f"the server exited with code {proc.returncode} while starting"
            if server.stopping:
                return "stopped"
            with contextlib.suppress(*PROBE_ERRORS):  # not listening yet
                if await client.healthy(timeout_s=5) and server.model_name in await _model_ids(client):
                    return None
            with contextlib.suppress(asyncio.TimeoutError):  # wakes at once if the process dies
                await asyncio.wait_for(server.died.wait(), timeout=0.5)
        return f"not healthy after {self.config.startup_timeout_s:g} s"

    # ------------------------------------------------------------------ exits and restarts

    def notice_exit(self, server: Server, *, refused: bool = False) -> None:
        """Handle a dead process now if the exit watcher has not yet (a failed request noticed first).

        ``refused``: a connection to its port was refused. Nothing but a dead or dying server refuses on a
        port we started it on (a process being killed closes its socket before it can be reaped).
        """
        proc = server.proc
        if proc is None or server.remote or server.state != "ready":
            return
        if not proc.alive:
            self.declare_dead(server, proc)
        elif refused:
            self.declare_dead(server, proc, "its port refused connections")

    async def confirm_exit(self, server: Server, within_s: float = 1.0) -> None:
        """A connection broke mid-request: if the process is exiting, wait (briefly) until it is reaped and
        declare it dead before the request's error is returned, so the next request already sees a restart
        under way (503) instead of a reset from a process that is still tearing down its memory."""
        proc = server.proc
        deadline = time.monotonic() + within_s
        while proc is not None and not server.remote and server.state == "ready" and proc is server.proc:
            if not proc.alive:
                self.declare_dead(server, proc)
                return
            if server.died.is_set() or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)

    def declare_dead(self, server: Server, proc: VLLMProcess, reason: str | None = None) -> None:
        """``proc`` exited (or was killed as hung): fail its requests, kill its group, restart in the background."""
        if server.proc is not proc or server.died.is_set():
            return  # an older process, or already handled
        server.died.set()  # fails this process's in-flight requests at once
        server.drop_connections()
        proc.forget()
        proc.signal_group(signal.SIGKILL)  # an engine-core child orphaned by a dead API server
        if server.state != "ready" or server.stopping or self.closed:
            return  # a start in progress reports its own failure
        server.adapters.clear()
        server.last_error = (reason or f"exited with code {proc.returncode}") + _tail_suffix(
            proc, self.log_path(server)
        )
        log.warning("vLLM for %s died (%s); restarting", server.base_id, server.last_error)
        server.state = "starting"
        server.restarts += 1
        metrics.VLLM_SERVER_RESTARTS.labels(base=server.base_id).inc()
        observe(server)
        server.started_at = time.monotonic()
        server.task = asyncio.create_task(self._restart_loop(server), name=f"vllm-restart-{server.base_id}")

    async def _restart_loop(self, server: Server) -> None:
        """Restart until it works, backing off (2, 4, ... 60 s) after failed attempts."""
        # The first attempt was counted and marked "starting" by declare_dead, synchronously.
        await self._release_dead(server)
        attempt = 0
        while not self.closed and not server.stopping:
            if attempt:
                delay = min(60.0, 2.0**attempt)
                server.next_attempt_at = time.monotonic() + delay
                await asyncio.sleep(delay)
                server.restarts += 1
                metrics.VLLM_SERVER_RESTARTS.labels(base=server.base_id).inc()
                server.state = "starting"
                server.started_at = time.monotonic()
            if await self.start(server):
                return
            attempt += 1

    async def _release_dead(self, server: Server) -> None:
        """Let a killed process group finish dying, so its port is free again (the restarted server keeps its
        URL) and its shared memory can be removed. Bounded: a stuck zombie must not block the restart."""
        proc = server.proc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            (proc is not None and proc.group_alive())
            or (server.port is not None and not port_is_free(self.config.host, server.port))
        ):
            await asyncio.sleep(0.2)
        if proc is not None:
            removed = await asyncio.to_thread(proc.remove_leaked_shm)
            if removed:
                log.info("removed %d shared-memory segments left by the dead vLLM server", len(removed))

    async def stop(self, server: Server) -> None:
        """Stop ``server`` for good (its in-flight requests fail now); a managed one's process is terminated."""
        server.stopping = True
        if server.task is not None and not server.task.done():
            server.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await server.task
        server.died.set()  # in-flight requests fail now rather than on a reset connection
        if (closing := server.drop_connections()) is not None:
            await closing
        if not server.remote:
            server.state = "dead"
            server.adapters.clear()
            observe(server)
        if server.proc is not None:
            await asyncio.to_thread(server.proc.terminate, self.config.terminate_timeout_s)
        server.notify()  # its slot is free once its process is gone

    # ------------------------------------------------------------------ health

    async def check(self, server: Server) -> None:
        """One periodic health check: a remote server's reachability; a managed one is restarted after
        ``health_failures_before_restart`` failed checks in a row."""
        timeout_s = max(5.0, self.config.health_interval_s)
        if server.remote:
            server.reachable = await server.http.healthy(timeout_s=timeout_s)
            observe(server)
            return
        if server.state != "ready" or server.proc is None:
            return
        if not server.proc.alive:
            self.notice_exit(server)
            return
        if await server.http.healthy(timeout_s=timeout_s):
            server.health_failures = 0
            return
        server.health_failures += 1
        if server.health_failures >= self.config.health_failures_before_restart:
            reason = f"killed after {server.health_failures} failed health checks"
            log.warning("vLLM for %s: %s", server.base_id, reason)
            # Declared dead now, not when the exit is seen: a big process can take a while to be reaped.
            self.declare_dead(server, server.proc, reason)


async def _model_ids(client: VLLMClient) -> set[str]:
    return {m.get("id") for m in await client.models(timeout_s=5)}


def _tail_suffix(proc: VLLMProcess, log_path: Path) -> str:
    tail = "\n".join(proc.log_tail(_ERROR_TAIL_CHARS).splitlines()[-_ERROR_TAIL_LINES:])
    return f"\n--- server log tail ({log_path}):\n{tail}" if tail else ""
