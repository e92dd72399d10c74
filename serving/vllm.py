"""The vLLM engine: one supervised vLLM OpenAI server per base model, adapters loaded at runtime.

Each base (``Target.base_id``) gets one managed server, started lazily (or by ``ensure_server``) with
``--enable-lora``; adapters are loaded into it through ``POST /v1/load_lora_adapter`` and then addressed by
their id as the request's ``model``. All requests of a ``generate`` call go out concurrently over pooled
connections, so requests for different adapters of one base meet in the same vLLM batch. Non-streamed
generations (the latency-critical hop) go over aiohttp, about 0.6 ms less client CPU per call than httpx,
with one connection pool per server process that is dropped when that process dies (so the next request
reconnects and is refused, rather than reusing a connection to the dead process); streams, adapter loads
and health checks use httpx.

Supervision: a server's exit is noticed at once (pidfd) and by a periodic health check; a dead server is
restarted in the background while requests get ``EngineUnavailable(retry_after=...)``. Every await on a
server is raced against that server's death, so a request in flight when it dies fails at once with
``GenerationFailed`` instead of hanging.

``VLLMConfig.remote_servers`` points a base at a vLLM server elsewhere (another machine, a Ray Serve LLM
deployment): no process is started and adapters are loaded by path through the same endpoint, so the
adapter folders must be visible to that server under the same path.

An engine belongs to the event loop it is first used in (its HTTP client and exit watchers live there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import httpx

from core.errors import MoergeError, Unprocessable, ValidationFailed
from core.lora import VALID_LORA_RANKS, largest_rank, lora_rank_for
from serving.engine import (
    Capabilities,
    EngineUnavailable,
    GenChunk,
    GenerationFailed,
    GenRequest,
    GenResult,
    Target,
    TokenTrace,
)
from serving.vllm_plugin import COMPILE_ENV, LORA_OPS_CHOICES, LORA_OPS_ENV
from serving.vllm_process import (
    VLLMProcess,
    cpu_bind_list,
    pick_port,
    port_is_free,
    server_command,
    server_env,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
ServerState = Literal["starting", "ready", "dead", "remote"]

# Used for retry_after before a server has ever started here (measured: 30-50 s on 2 cores).
_DEFAULT_STARTUP_S = 60.0
_ERROR_TAIL_CHARS = 1500  # of the server log, in last_error (admin view): enough for the end of a traceback
_ERROR_TAIL_LINES = 15
# Errors to callers name the base and this, never a path, URL or log line: those go to moerge's log and to the
# admin-only view of the server (its last_error, log path and pid).
ADMIN_HINT = "an admin can read why with GET /api/engines (admin key) or in moerge's log"


@dataclass(frozen=True)
class VLLMConfig:
    port_start: int = field(
        default=8100, metadata={"help": "first port tried for managed servers; each takes the next free one"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address managed servers bind"})
    max_model_len: int = field(default=2048, metadata={"help": "--max-model-len: longest prompt + completion"})
    max_loras: int = field(default=8, metadata={"help": "--max-loras: distinct adapters in one batch"})
    max_lora_rank: int = field(
        default=16,
        metadata={
            "help": "--max-lora-rank; must be >= every adapter's r; vLLM accepts only "
            + ", ".join(map(str, VALID_LORA_RANKS))
            + " (a larger Target.max_lora_rank is rounded up to one of these)"
        },
    )
    kv_cache_gib: float = field(default=2, metadata={"help": "VLLM_CPU_KVCACHE_SPACE: KV cache per server, GiB"})
    max_servers: int = field(
        default=3,
        metadata={
            "help": "managed servers running at once (each holds its model and KV cache); starting one more "
            "stops the least recently used idle one"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "--dtype; float32 is 3-5x faster than bf16 on this CPU"})
    cpu_threads_bind: str = field(
        default="all",
        metadata={
            "help": "VLLM_CPU_OMP_THREADS_BIND for managed servers: `all` binds the worker's OpenMP threads to "
            "every CPU this process may use; vLLM's own `auto` reserves one core for its scheduler, which "
            "on a 2-core machine halves generation speed; `nobind`, or an explicit list such as `0-3`"
        },
    )
    lora_ops: str = field(
        default="grouped",
        metadata={
            "help": "multi-LoRA ops inside managed CPU servers: `grouped` (serving/lora_ops.py, no per-token "
            "copy of the adapter weights; about 10x faster LoRA matmuls in prefill here) or `vllm` (vLLM's own)"
        },
    )
    compile: bool = field(
        default=True,
        metadata={
            "help": "managed CPU servers keep vLLM's compiled model with LoRA on (serving/vllm_compile.py; vLLM "
            "itself runs eager whenever LoRA is enabled on CPU): a decode step about 30% faster; the first start of "
            "a model spends a minute or two compiling (inductor's cache makes later starts quicker)"
        },
    )
    startup_timeout_s: float = field(default=300, metadata={"help": "a server not healthy after this is killed"})
    request_timeout_s: float = field(
        default=600, metadata={"help": "longest wait for a response (between stream chunks when streaming)"}
    )
    health_interval_s: float = field(default=5, metadata={"help": "seconds between health checks of each server"})
    health_failures_before_restart: int = field(
        default=3, metadata={"help": "consecutive failed health checks after which a live server is restarted"}
    )
    remote_servers: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "base id -> URL of a vLLM OpenAI server elsewhere: no process is started; adapters are "
            "loaded by path through its /v1/load_lora_adapter, so their folders must be visible to that server"
        },
    )
    log_dir: Path | None = field(
        default=None, metadata={"help": "where each server's stdout/stderr goes (default: <tmp>/moerge-vllm)"}
    )
    wait_for_start: bool = field(
        default=True,
        metadata={
            "help": "a request that triggers a base's first start waits for it (up to startup_timeout_s); "
            "otherwise it gets EngineUnavailable at once. Restarts never make requests wait"
        },
    )
    max_connections: int = field(default=256, metadata={"help": "HTTP connection pool size (concurrent requests)"})
    terminate_timeout_s: float = field(default=15, metadata={"help": "SIGTERM grace before SIGKILL on close"})
    extra_args: tuple[str, ...] = field(default=(), metadata={"help": "more arguments for managed servers"})
    env_passthrough: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "names of more environment variables managed servers inherit, beyond the allow-list "
            "(serving/vllm_process.py: CHILD_ENV_NAMES, CHILD_ENV_PREFIXES); nothing else reaches them"
        },
    )

    def __post_init__(self) -> None:
        if self.max_lora_rank not in VALID_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VALID_LORA_RANKS}, got {self.max_lora_rank}")
        if self.lora_ops not in LORA_OPS_CHOICES:
            raise ValueError(f"lora_ops must be one of {LORA_OPS_CHOICES}, got {self.lora_ops!r}")
        for name in (
            "max_model_len",
            "max_loras",
            "startup_timeout_s",
            "request_timeout_s",
            "health_interval_s",
            "max_servers",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class _ServerDied(Exception):
    """Internal: the server died while a request was waiting on it."""


@dataclass(eq=False)
class _Server:
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
    start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[Any] | None = None  # the start or restart loop in progress
    started_at: float = 0.0
    startup_s: float | None = None
    next_attempt_at: float = 0.0
    health_failures: int = 0
    reachable: bool | None = None  # remote servers: last health check
    last_error: str | None = None
    stopping: bool = False
    pool: aiohttp.ClientSession | None = None  # generation connections to the current process
    in_flight: int = 0  # requests using it now (an idle server may be stopped to make room)
    started_rank: int = 0  # --max-lora-rank of the running process
    last_used: float = 0.0

    def drop_pool(self) -> asyncio.Task[None] | None:
        """Forget the current process's connections (it died or is stopping); returns the closing task."""
        pool, self.pool = self.pool, None
        if pool is None or pool.closed:
            return None
        return asyncio.get_running_loop().create_task(pool.close())

    @property
    def busy_starting(self) -> bool:
        return self.task is not None and not self.task.done()


class _Watch:
    """Races every await of one request against its server's death, so nothing waits on a dead server."""

    def __init__(self, server: _Server) -> None:
        self.died = server.died
        self._waiter: asyncio.Future[Any] | None = None
        self._server: _Server | None = server
        server.in_flight += 1
        server.last_used = time.monotonic()

    async def run(self, aw: Awaitable[T]) -> T:
        if self.died.is_set():
            raise _ServerDied
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
        raise _ServerDied

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()
        if self._server is not None:
            self._server.in_flight -= 1
            self._server.last_used = time.monotonic()
            self._server = None


class VLLMEngine:
    """``Engine`` over managed or remote vLLM OpenAI servers, one per base model."""

    name = "vllm"
    capabilities = Capabilities()  # plain and multi-LoRA requests; mixtures and fusion need the torch engine

    def __init__(self, config: VLLMConfig | None = None) -> None:
        self.config = config or VLLMConfig()
        self.log_dir = Path(self.config.log_dir or Path(tempfile.gettempdir()) / "moerge-vllm")
        self._servers: dict[str, _Server] = {}
        self._client: httpx.AsyncClient | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    async def ensure_server(self, target: Target, *, wait: bool = True) -> str:
        """Start ``target``'s base server if needed; with ``wait``, until it is ready (restarts included).

        Returns the server's URL. Raises ``EngineUnavailable`` if it does not come up (the log tail is in
        ``status()``'s ``last_error``).
        """
        server = await self._acquire(target, wait=wait, force_wait=wait)
        return server.url

    async def generate(
        self, requests: list[GenRequest], *, wait_for_start: bool | None = None
    ) -> list[GenResult | BaseException]:
        """Send all requests at once; failures come back in place of results, never raised."""
        wait = self.config.wait_for_start if wait_for_start is None else wait_for_start
        results = await asyncio.gather(*(self._run(req, wait) for req in requests), return_exceptions=True)
        out: list[GenResult | BaseException] = []
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, MoergeError | asyncio.CancelledError):
                log.exception("vLLM request failed unexpectedly", exc_info=res)
                failure = GenerationFailed(f"vLLM request failed ({type(res).__name__}); {ADMIN_HINT}")
                failure.__cause__ = res
                res = failure
            out.append(res)
        return out

    async def stream(self, request: GenRequest, *, wait_for_start: bool | None = None) -> AsyncIterator[GenChunk]:
        """Yield the completion's text as it is generated; the last chunk has the finish reason and token counts."""
        wait = self.config.wait_for_start if wait_for_start is None else wait_for_start
        _refuse_torch_only(request)
        path, body, chat = _payload(request, stream=True)
        server = await self._acquire(request.target, wait=wait)
        watch = _Watch(server)
        resp: httpx.Response | None = None
        try:
            for attempt in range(2):
                body["model"] = await self._model_for(server, request.target, watch)
                http_req = self._http().build_request("POST", server.url + path, json=body)
                resp = await self._call(server, watch, self._http().send(http_req, stream=True))
                if resp.status_code == 404 and request.target.adapter_id and attempt == 0:
                    # The server forgot the adapter (restarted behind our back): load it again, once.
                    await resp.aclose()
                    server.adapters.pop(request.target.adapter_id, None)
                    continue
                break
            assert resp is not None
            if resp.status_code != 200:
                await self._call(server, watch, resp.aread())
                _raise_for_status(resp, server)
            finish: str | None = None
            usage: dict[str, Any] = {}
            lines = resp.aiter_lines()
            done = False
            while not done:
                line = await self._call(server, watch, _next_line(lines))
                if line is None:
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    log.warning("vLLM for %s: error inside a stream: %s", server.base_id, _error_message(event))
                    raise GenerationFailed(f"the vLLM server for {server.base_id!r} failed mid-stream; {ADMIN_HINT}")
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        yield GenChunk(text=piece)
                    finish = choice.get("finish_reason") or finish
                usage = event.get("usage") or usage
            if not done:
                raise GenerationFailed(f"the vLLM server for {server.base_id!r} ended the stream early")
            yield GenChunk(
                text="",
                finish_reason=finish or "stop",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        finally:
            watch.close()
            if resp is not None:
                await resp.aclose()

    async def trace(self, request: GenRequest, completion: str = "") -> TokenTrace:
        raise ValidationFailed("the vllm engine cannot trace token-level routes", param="trace")

    async def status(self) -> list[dict[str, Any]]:
        """One entry per server: base_id, url, pid, state (starting|ready|dead|remote), adapters, restarts."""
        for base_id in self.config.remote_servers:  # configured remotes are listed before first use too
            self._server_entry(base_id, None, 0)
        out = []
        for server in self._servers.values():
            proc = server.proc
            entry: dict[str, Any] = {
                "base_id": server.base_id,
                "url": server.url,
                "pid": proc.pid if proc is not None and not server.died.is_set() and proc.alive else None,
                "state": server.state,
                "adapters": sorted(server.adapters),
                "restarts": server.restarts,
                "last_error": server.last_error,
            }
            if server.remote:
                entry["reachable"] = server.reachable
            else:
                entry["startup_s"] = None if server.startup_s is None else round(server.startup_s, 1)
                entry["log"] = str(self._log_path(server))
            out.append(entry)
        return out

    async def stop_server(self, base_id: str) -> None:
        """Terminate one base's managed server (e.g. to free memory); the next request starts it again."""
        server = self._servers.pop(base_id, None)
        if server is not None:
            await self._stop(server)

    async def close(self) -> None:
        """Terminate every managed server (SIGTERM, then SIGKILL) and close the HTTP client."""
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        await asyncio.gather(*(self._stop(s) for s in self._servers.values()), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ requests

    async def _run(self, request: GenRequest, wait: bool) -> GenResult:
        _refuse_torch_only(request)
        path, body, chat = _payload(request, stream=False)  # invalid input fails before any server starts
        server = await self._acquire(request.target, wait=wait)
        watch = _Watch(server)
        try:
            for attempt in range(2):
                body["model"] = await self._model_for(server, request.target, watch)
                started = time.perf_counter()
                resp = await self._call(server, watch, self._post(server, path, body))
                if resp.status_code == 404 and request.target.adapter_id and attempt == 0:
                    server.adapters.pop(request.target.adapter_id, None)  # forgotten by the server: reload once
                    continue
                break
            latency = time.perf_counter() - started
            _raise_for_status(resp, server)
            data = resp.json()
        finally:
            watch.close()
        choice = data["choices"][0]
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        usage = data.get("usage") or {}
        return GenResult(
            text=text or "",
            finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
            extra={"id": data.get("id"), "model": body["model"], "stop_reason": choice.get("stop_reason")},
        )

    async def _model_for(self, server: _Server, target: Target, watch: _Watch) -> str:
        """The request's ``model``: the base's served name, or the adapter id after loading it (once)."""
        adapter_id = target.adapter_id
        if adapter_id is None:
            return server.model_name
        if adapter_id in server.adapters:
            return adapter_id
        if target.adapter_dir is None:
            raise ValidationFailed(f"adapter {adapter_id!r} has no folder to load", param="model")
        adapter_path = str(Path(target.adapter_dir).resolve()) if not server.remote else str(target.adapter_dir)
        if not server.remote:
            rank = _adapter_rank(Path(adapter_path))
            if rank is not None and rank > server.started_rank:
                await self._restart_for_rank(server, target, adapter_id, rank)
        lock = server.adapter_locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:  # concurrent first requests for one adapter load it once
            if adapter_id in server.adapters:
                return adapter_id
            epoch = server.epoch
            body = {"lora_name": adapter_id, "lora_path": adapter_path}
            resp = await self._call(server, watch, self._http().post(server.url + "/v1/load_lora_adapter", json=body))
            # "already been loaded": another engine (remote mode) or an earlier attempt loaded it; fine.
            if resp.status_code != 200 and not (resp.status_code == 400 and "already" in resp.text):
                log.warning(
                    "vLLM for %s could not load adapter %s from %s: %s",
                    server.base_id,
                    adapter_id,
                    adapter_path,
                    _error_message(resp),
                )
                where = " (its folder must be visible to the remote server, same path)" if server.remote else ""
                raise GenerationFailed(
                    f"the vLLM server for {server.base_id!r} could not load adapter {adapter_id!r}{where}; "
                    + ADMIN_HINT,
                    param="model",
                )
            if server.epoch == epoch:
                server.adapters[adapter_id] = adapter_path
        return adapter_id

    async def _call(self, server: _Server, watch: _Watch, aw: Awaitable[T]) -> T:
        """Await ``aw`` (an HTTP exchange with ``server``), turning failures into moerge errors."""
        try:
            return await watch.run(aw)
        except _ServerDied:
            # The log tail goes to status()/last_error (admin view); here only where to look.
            raise GenerationFailed(
                f"the vLLM server for {server.base_id!r} died during the request; it is being restarted; {ADMIN_HINT}"
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, aiohttp.ClientConnectorError) as exc:
            refused = isinstance(exc, httpx.ConnectError | aiohttp.ClientConnectorError)
            self._notice_exit(server, refused=refused)
            log.warning("vLLM for %s: cannot connect to %s: %s", server.base_id, server.url, exc)
            raise self._unavailable(server, f"cannot connect to the vLLM server for {server.base_id!r}") from exc
        except httpx.PoolTimeout as exc:
            raise EngineUnavailable("too many requests in flight to vLLM; retry shortly", retry_after=1) from exc
        except (httpx.TimeoutException, TimeoutError) as exc:  # aiohttp's timeouts are TimeoutErrors
            raise GenerationFailed(
                f"the vLLM server for {server.base_id!r} gave no answer within {self.config.request_timeout_s:g} s"
            ) from exc
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            await self._confirm_exit(server)
            log.warning("vLLM for %s: connection to %s failed mid-request: %r", server.base_id, server.url, exc)
            raise GenerationFailed(
                f"connection to the vLLM server for {server.base_id!r} failed mid-request: {type(exc).__name__}"
            ) from exc

    # ------------------------------------------------------------------ servers

    def _server_entry(self, base_id: str, base_dir: Path | None, rank: int) -> _Server:
        server = self._servers.get(base_id)
        if server is None:
            remote_url = self.config.remote_servers.get(base_id)
            if remote_url is not None:
                # Accept an OpenAI-style base URL ending in /v1 as well as the bare server URL.
                url = re.sub(r"/v1/?$", "", remote_url.rstrip("/"))
                server = _Server(base_id=base_id, base_dir=None, remote=True, url=url, state="remote")
            else:
                server = _Server(base_id=base_id, base_dir=base_dir, remote=False, model_name=base_id)
            self._servers[base_id] = server
        if not server.remote:
            if base_dir is not None:
                server.base_dir = base_dir
            # Takes effect at the next (re)start; a running server keeps the rank it started with.
            server.rank = max(server.rank, lora_rank_for(max(self.config.max_lora_rank, rank)))
        return server

    async def _acquire(self, target: Target, *, wait: bool, force_wait: bool = False) -> _Server:
        """The ready server for ``target``'s base, starting it if needed; else ``EngineUnavailable``.

        Waits for a start only if it is the base's first (``wait``) or ``force_wait`` is given.
        """
        if self._closed:
            raise EngineUnavailable("the vLLM engine is closed", retry_after=5)
        self._ensure_monitor()
        if target.base_id not in self.config.remote_servers:
            _served_rank(target.max_lora_rank, target)  # refused before a server is recorded or started
        server = self._server_entry(target.base_id, target.base_dir, target.max_lora_rank)
        if server.remote:
            if not server.model_name:
                await self._resolve_remote(server)
            return server
        if server.state == "ready":
            if server.proc is not None and server.proc.alive:
                return server
            self._notice_exit(server)  # died, and the exit watcher has not run yet
        if server.state == "dead" and not server.busy_starting:
            await self._make_room(server)
        async with server.start_lock:  # concurrent first requests start one process
            if server.state == "dead" and not server.busy_starting:
                server.state = "starting"
                server.started_at = time.monotonic()
                server.task = asyncio.create_task(self._start(server), name=f"vllm-start-{server.base_id}")
        if server.state == "ready":
            return server
        if server.task is not None and (force_wait or (wait and not server.ever_ready)):
            # asyncio.wait neither cancels the shared start task on our timeout nor raises its outcome.
            await asyncio.wait({server.task}, timeout=self.config.startup_timeout_s + 30)
            if server.state == "ready":
                return server
        raise self._unavailable(server)

    async def _restart_for_rank(self, server: _Server, target: Target, adapter_id: str, rank: int) -> None:
        """An adapter above the running server's --max-lora-rank (a merged LoRA, say): restart the server
        with a rank that fits once it is idle, and tell the caller to come back (EngineUnavailable)."""
        server.rank = max(server.rank, _served_rank(rank, target))  # every later start keeps it
        if server.in_flight > 1:
            raise EngineUnavailable(
                f"adapter {adapter_id!r} has rank {rank}, above the --max-lora-rank {server.started_rank} the vLLM "
                f"server for {server.base_id!r} runs with; it restarts with {server.rank} once its "
                f"{server.in_flight - 1} other requests are done",
                retry_after=5,
            )
        log.info(
            "restarting vLLM for %s with --max-lora-rank %d for adapter %s", server.base_id, server.rank, adapter_id
        )
        await self._stop(server)
        server.stopping = False
        try:
            await self._acquire(target, wait=False)
        except EngineUnavailable as exc:
            raise EngineUnavailable(
                f"restarting the vLLM server for {server.base_id!r} with --max-lora-rank {server.rank} for adapter "
                f"{adapter_id!r} (rank {rank})",
                retry_after=exc.retry_after,
            ) from None

    async def _make_room(self, newcomer: _Server) -> None:
        """Stop least recently used idle servers until ``newcomer`` fits under ``max_servers``."""
        while True:
            running = [
                s
                for s in self._servers.values()
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

    async def _start(self, server: _Server) -> bool:
        """Start a process for ``server`` and wait until it is healthy. Never raises; False on failure."""
        cfg = self.config
        server.state = "starting"  # started_at was set by the caller (the wait before a restart counts)
        server.epoch += 1
        server.adapters.clear()
        server.died = asyncio.Event()
        server.health_failures = 0
        proc: VLLMProcess | None = None
        try:
            if server.base_dir is None:
                raise RuntimeError("no base model folder")
            avoid = {s.port for s in self._servers.values() if s is not server and s.port is not None}
            port = pick_port(cfg.host, cfg.port_start, prefer=server.port, avoid=avoid)
            server.port, server.url = port, f"http://{cfg.host}:{port}"
            server.started_rank = server.rank
            command = server_command(
                model_dir=server.base_dir,
                served_name=server.model_name,
                port=port,
                host=cfg.host,
                max_lora_rank=server.rank,
                max_loras=cfg.max_loras,
                max_model_len=cfg.max_model_len,
                dtype=cfg.dtype,
                extra_args=cfg.extra_args,
            )
            proc = VLLMProcess(command, child_env(cfg), self._log_path(server))
            proc.start()
            server.proc = proc
            started_proc = proc
            proc.watch(asyncio.get_running_loop(), lambda: self._declare_dead(server, started_proc))
            log.info("starting vLLM for %s on %s (pid %s, log %s)", server.base_id, server.url, proc.pid, proc.log_path)
            error = await self._wait_healthy(server, proc)
        except asyncio.CancelledError:
            if proc is not None:
                proc.forget()
                proc.signal_group(signal.SIGKILL)
            raise
        except Exception as exc:  # bad folder, no free port, cannot exec: report like a failed start
            error = f"{type(exc).__name__}: {exc}"
        if error is None and not server.stopping:
            server.state = "ready"
            server.ever_ready = True
            server.startup_s = time.monotonic() - server.started_at
            server.last_error = None
            log.info("vLLM for %s ready in %.1f s", server.base_id, server.startup_s)
            return True
        server.state = "dead"
        server.last_error = f"start failed: {error}" if error else "stopped"
        if proc is not None:
            server.last_error += _tail_suffix(proc, self._log_path(server))
            await asyncio.to_thread(proc.terminate, 5.0)
        log.error("vLLM for %s did not start: %s", server.base_id, server.last_error)
        return False

    async def _wait_healthy(self, server: _Server, proc: VLLMProcess) -> str | None:
        """None once /health is 200 and /v1/models lists the base; else why not (exit, timeout)."""
        deadline = server.started_at + self.config.startup_timeout_s
        client = self._http()
        while time.monotonic() < deadline:
            if not proc.alive:
                return f"the server exited with code {proc.returncode} while starting"
            if server.stopping:
                return "stopped"
            try:
                health = await client.get(server.url + "/health", timeout=5)
                if health.status_code == 200:
                    models = await client.get(server.url + "/v1/models", timeout=5)
                    ids = {m.get("id") for m in models.json().get("data", [])} if models.status_code == 200 else set()
                    if server.model_name in ids:
                        return None
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet
            with contextlib.suppress(asyncio.TimeoutError):  # wakes at once if the process dies
                await asyncio.wait_for(server.died.wait(), timeout=0.5)
        return f"not healthy after {self.config.startup_timeout_s:g} s"

    def _notice_exit(self, server: _Server, *, refused: bool = False) -> None:
        """Handle a dead process now if the exit watcher has not yet (a failed request noticed first).

        ``refused``: a connection to its port was refused. Nothing but a dead or dying server refuses on a
        port we started it on (a process being killed closes its socket before it can be reaped).
        """
        proc = server.proc
        if proc is None or server.remote or server.state != "ready":
            return
        if not proc.alive:
            self._declare_dead(server, proc)
        elif refused:
            self._declare_dead(server, proc, "its port refused connections")

    async def _confirm_exit(self, server: _Server, within_s: float = 1.0) -> None:
        """A connection broke mid-request: if the process is exiting, wait (briefly) until it is reaped and
        declare it dead before the request's error is returned, so the next request already sees a restart
        under way (503) instead of a reset from a process that is still tearing down its memory."""
        proc = server.proc
        deadline = time.monotonic() + within_s
        while proc is not None and not server.remote and server.state == "ready" and proc is server.proc:
            if not proc.alive:
                self._declare_dead(server, proc)
                return
            if server.died.is_set() or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)

    def _declare_dead(self, server: _Server, proc: VLLMProcess, reason: str | None = None) -> None:
        """``proc`` exited (or was killed as hung): fail its requests, kill its group, restart in the background."""
        if server.proc is not proc or server.died.is_set():
            return  # an older process, or already handled
        server.died.set()  # fails this process's in-flight requests at once
        server.drop_pool()
        proc.forget()
        proc.signal_group(signal.SIGKILL)  # an engine-core child orphaned by a dead API server
        if server.state != "ready" or server.stopping or self._closed:
            return  # a start in progress reports its own failure
        server.adapters.clear()
        server.last_error = (reason or f"exited with code {proc.returncode}") + _tail_suffix(
            proc, self._log_path(server)
        )
        log.warning("vLLM for %s died (%s); restarting", server.base_id, server.last_error)
        server.state = "starting"
        server.restarts += 1
        server.started_at = time.monotonic()
        server.task = asyncio.create_task(self._restart_loop(server), name=f"vllm-restart-{server.base_id}")

    async def _restart_loop(self, server: _Server) -> None:
        """Restart until it works, backing off (2, 4, ... 60 s) after failed attempts."""
        # The first attempt was counted and marked "starting" by _declare_dead, synchronously.
        await self._release_dead(server)
        attempt = 0
        while not self._closed and not server.stopping:
            if attempt:
                delay = min(60.0, 2.0**attempt)
                server.next_attempt_at = time.monotonic() + delay
                await asyncio.sleep(delay)
                server.restarts += 1
                server.state = "starting"
                server.started_at = time.monotonic()
            if await self._start(server):
                return
            attempt += 1

    async def _release_dead(self, server: _Server) -> None:
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

    async def _resolve_remote(self, server: _Server) -> None:
        """Find the base's name on a remote server: ``base_id`` if served, else its only base model."""
        try:
            resp = await self._http().get(server.url + "/v1/models", timeout=10)
            resp.raise_for_status()
            models = resp.json().get("data", [])
        except (httpx.HTTPError, ValueError) as exc:
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

    async def _stop(self, server: _Server) -> None:
        server.stopping = True
        if server.task is not None and not server.task.done():
            server.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await server.task
        server.died.set()  # in-flight requests fail now rather than on a reset connection
        if (closing := server.drop_pool()) is not None:
            await closing
        if not server.remote:
            server.state = "dead"
            server.adapters.clear()
        if server.proc is not None:
            await asyncio.to_thread(server.proc.terminate, self.config.terminate_timeout_s)

    # ------------------------------------------------------------------ health

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="vllm-health")

    async def _monitor_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.health_interval_s)
            servers = list(self._servers.values())
            await asyncio.gather(*(self._check(s) for s in servers), return_exceptions=True)

    async def _check(self, server: _Server) -> None:
        if server.remote:
            server.reachable = await self._healthy(server)
            return
        if server.state != "ready" or server.proc is None:
            return
        if not server.proc.alive:
            self._notice_exit(server)
            return
        if await self._healthy(server):
            server.health_failures = 0
            return
        server.health_failures += 1
        if server.health_failures >= self.config.health_failures_before_restart:
            reason = f"killed after {server.health_failures} failed health checks"
            log.warning("vLLM for %s: %s", server.base_id, reason)
            # Declared dead now, not when the exit is seen: a big process can take a while to be reaped.
            self._declare_dead(server, server.proc, reason)

    async def _healthy(self, server: _Server) -> bool:
        try:
            resp = await self._http().get(server.url + "/health", timeout=max(5.0, self.config.health_interval_s))
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    # ------------------------------------------------------------------ helpers

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            cfg = self.config
            self._client = httpx.AsyncClient(
                # read covers a whole non-streamed generation; connect is short so a dead port fails fast.
                timeout=httpx.Timeout(connect=5.0, read=cfg.request_timeout_s, write=30.0, pool=30.0),
                limits=httpx.Limits(
                    max_connections=cfg.max_connections,
                    max_keepalive_connections=cfg.max_connections,
                    # Below uvicorn's 5 s keep-alive in vLLM (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so we never send on
                    # a connection the server is closing as idle.
                    keepalive_expiry=4.0,
                ),
                trust_env=False,  # a proxy from the environment must not sit between us and local servers
            )
        return self._client

    async def _post(self, server: _Server, path: str, body: dict[str, Any]) -> _Reply:
        """POST a JSON body over ``server``'s generation pool; the whole reply is read before returning."""
        if server.pool is None or server.pool.closed:
            cfg = self.config
            server.pool = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=cfg.max_connections, keepalive_timeout=4.0),  # see _http
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=cfg.request_timeout_s),
                trust_env=False,
                json_serialize=json.dumps,
            )
        async with server.pool.post(server.url + path, json=body) as resp:
            return _Reply(resp.status, await resp.read())

    def _log_path(self, server: _Server) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", server.base_id)
        return self.log_dir / f"vllm-{safe}.log"

    def _unavailable(self, server: _Server, detail: str | None = None) -> EngineUnavailable:
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
        return EngineUnavailable(detail or _unavailable_message(server), retry_after=max(1, math.ceil(retry)))


# ---------------------------------------------------------------------- pure helpers


def child_env(config: VLLMConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a managed server of ``config`` starts with (allow-listed: see ``server_env``)."""
    return server_env(
        config.kv_cache_gib,
        {
            "VLLM_CPU_OMP_THREADS_BIND": cpu_bind_list(config.cpu_threads_bind),
            LORA_OPS_ENV: config.lora_ops,
            COMPILE_ENV: "1" if config.compile else "0",
        },
        passthrough=config.env_passthrough,
        environ=environ,
    )


def _payload(request: GenRequest, *, stream: bool) -> tuple[str, dict[str, Any], bool]:
    """(path, body without model, is_chat) for vLLM's OpenAI API."""
    s = request.sampling
    body: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.min_tokens:
        body["min_tokens"] = s.min_tokens
    if s.ignore_eos:
        body["ignore_eos"] = True
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None and request.prompt is None:
        body["messages"] = request.messages
        return "/v1/chat/completions", body, True
    if request.prompt is not None and request.messages is None:
        body["prompt"] = request.prompt
        return "/v1/completions", body, False
    raise ValidationFailed("give exactly one of messages (chat) or prompt (completion)", param="messages")


@dataclass(frozen=True)
class _Reply:
    """A complete non-streamed HTTP reply, read with the connection released (the parts of
    ``httpx.Response`` that the error helpers read)."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


async def _next_line(lines: AsyncIterator[str]) -> str | None:
    return await anext(lines, None)


def _error_message(resp_or_body: httpx.Response | _Reply | dict[str, Any]) -> str:
    """The message of vLLM's OpenAI-shaped error ({"error": {"message": ...}}), or the raw text."""
    body: Any
    if isinstance(resp_or_body, httpx.Response | _Reply):
        try:
            body = resp_or_body.json()
        except ValueError:
            return resp_or_body.text[:500] or f"HTTP {resp_or_body.status_code}"
    else:
        body = resp_or_body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(body)[:500]


def _raise_for_status(resp: httpx.Response | _Reply, server: _Server) -> None:
    if resp.status_code < 400:
        return
    message = _error_message(resp)
    param = None
    with contextlib.suppress(ValueError, AttributeError):
        param = (resp.json().get("error") or {}).get("param")
    if resp.status_code in (400, 422):  # vLLM validated the request: the caller's input is wrong, say why
        raise ValidationFailed(message, param=param)
    # Anything else is vLLM's own trouble, whose text can name files: logged, not passed on.
    log.warning("vLLM for %s answered %d: %s", server.base_id, resp.status_code, message)
    if resp.status_code == 503:
        raise EngineUnavailable(f"the vLLM server for {server.base_id!r} is unavailable; {ADMIN_HINT}", retry_after=5)
    raise GenerationFailed(
        f"the vLLM server for {server.base_id!r} answered {resp.status_code}; {ADMIN_HINT}", param=param
    )


def _unavailable_message(server: _Server) -> str:
    """Why ``server`` cannot answer, for any caller: its state, and after a failure where an admin reads why
    (``last_error`` holds the reason and the log tail, for the admin view only)."""
    if server.state == "dead" and server.last_error and server.last_error.startswith("start failed"):
        return f"the vLLM server for base {server.base_id!r} failed to start; {ADMIN_HINT}"
    what = f"the vLLM server for base {server.base_id!r} is {server.state}"
    if server.last_error and server.last_error != "stopped":
        what += f" after a failure; {ADMIN_HINT}"
    return what


def _tail_suffix(proc: VLLMProcess, log_path: Path) -> str:
    tail = "\n".join(proc.log_tail(_ERROR_TAIL_CHARS).splitlines()[-_ERROR_TAIL_LINES:])
    return f"\n--- server log tail ({log_path}):\n{tail}" if tail else ""


def _adapter_rank(adapter_dir: Path) -> int | None:
    """Largest LoRA rank in a PEFT adapter_config.json (r and any integer rank_pattern value), if readable.
    Anything else in it is registration's to refuse (registry/limits.py), not a reason to fail here."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    return largest_rank(cfg.get("r"), cfg.get("rank_pattern")) or None


def _served_rank(rank: int, target: Target) -> int:
    """The --max-lora-rank that serves ``rank``; an adapter above vLLM's largest is refused, naming the fix."""
    if rank > VALID_LORA_RANKS[-1]:
        name = target.served_name or target.adapter_id
        raise Unprocessable(
            f"adapter {name!r} has rank {rank}, above {VALID_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM "
            f"serves: re-register it with r and every rank_pattern value <= {VALID_LORA_RANKS[-1]}, or serve it "
            "with MOERGE_ENGINE=torch",
            param="model",
            code="adapter_unservable",
        )
    return lora_rank_for(rank)


def _refuse_torch_only(request: GenRequest) -> None:
    """vLLM runs one adapter per request: a token-level mixture or a fused request would silently be answered
    by one model alone (the app's EngineSet sends them to its torch engine instead)."""
    if request.target.mixture is not None or request.fusion is not None:
        what = "a token-level mixture" if request.target.mixture is not None else "a logit-fusion request"
        raise ValidationFailed(f"the vLLM engine cannot run {what}; use the torch engine", param="model")
