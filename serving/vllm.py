"""The vLLM engine: one supervised vLLM OpenAI server per base model, adapters loaded at runtime.

Each base (``Target.base_id``) gets one managed server, started lazily (or by ``ensure_server``) with
``--enable-lora``; adapters are loaded into it through ``POST /v1/load_lora_adapter`` and then addressed by
their id as the request's ``model``. All requests of a ``generate`` call go out concurrently over pooled
connections, so requests for different adapters of one base meet in the same vLLM batch.

Supervision: a server's exit is noticed at once (pidfd) and by a periodic health check; a dead server is
restarted in the background while requests get ``EngineUnavailable(retry_after=...)``. Every await on a
server is raced against that server's death, so a request in flight when it dies fails at once with
``GenerationFailed`` instead of hanging.

``VLLMConfig.remote_servers`` points a base at a vLLM server elsewhere (another machine, a Ray Serve LLM
deployment): no process is started and adapters are loaded by path through the same endpoint, so the
adapter folders must be visible to that server under the same path.

An engine belongs to the event loop it is first used in (its HTTP connections and exit watchers live there).

This module is the ``Engine`` itself; the parts it composes can be read one at a time:

- ``vllm_config``: ``VLLMConfig`` and the environment of a managed server (``child_env``);
- ``vllm_client``: the one HTTP client (aiohttp, one per server process, dropped when the process dies) for
  generations, streams, adapter loads, health checks and model listings;
- ``vllm_openai``: request bodies, replies and stream events of vLLM's OpenAI API, its errors as moerge's;
- ``vllm_server``: the state of one server, and ``Watch``, which races a request's awaits against its death;
- ``vllm_supervisor``: starting, health-checking, restarting and stopping a managed server's process;
- ``vllm_fleet``: the servers by base, started on demand within ``max_servers``, and HTTP failures mapped;
- ``vllm_adapters``: which adapters each server has loaded, loading on demand, restarts for a larger rank;
- ``vllm_process``: the child process itself (command line, environment, process group, log).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.errors import MoergeError, ValidationFailed
from serving.engine import Capabilities, GenChunk, GenerationFailed, GenRequest, GenResult, Target, TokenTrace
from serving.vllm_adapters import Adapters
from serving.vllm_client import EventStream
from serving.vllm_config import VLLMConfig, child_env
from serving.vllm_fleet import Fleet
from serving.vllm_mixtures import MixtureSlots
from serving.vllm_openai import StreamParser, gen_result, payload, raise_for_status, refuse_torch_only
from serving.vllm_server import ADMIN_HINT, Server, Watch

__all__ = ["VLLMConfig", "VLLMEngine", "child_env"]

log = logging.getLogger(__name__)


class VLLMEngine:
    """``Engine`` over managed or remote vLLM OpenAI servers, one per base model."""

    name = "vllm"
    # plain and multi-LoRA requests with OpenAI's options; mixtures as slots (serves_mixture); fusion needs torch
    capabilities = Capabilities(guidance=True, logprobs=True, choices=True)

    def __init__(self, config: VLLMConfig | None = None) -> None:
        self.config = config or VLLMConfig()
        self.log_dir = Path(self.config.log_dir or Path(tempfile.gettempdir()) / "moerge-vllm")
        self._fleet = Fleet(self.config, self.log_dir)
        self._adapters = Adapters(self._fleet)
        self.mixtures = MixtureSlots(self.config, Path(self.config.mixture_dir or self.log_dir.parent / "mixtures"))

    async def mixture_target(self, target: Target) -> Target | None:
        """The adapter-slot target that serves ``target``'s token-level or weighted mixture in this engine's vLLM
        (``serving/vllm_mixtures.py``), or None when only the torch engine can run it."""
        return await self.mixtures.target(target)

    def serves_mixture(self, target: Target) -> bool:
        """Whether ``target``'s mixture runs in this engine's vLLM (else only the torch engine can run it)."""
        return self.mixtures.places(target)

    async def _slotted(self, request: GenRequest) -> GenRequest:
        """``request`` on its mixture's slot when it has one here; else as it is (refused if torch-only)."""
        mixture = request.target.mixture
        if mixture is not None:
            slot = await self.mixture_target(request.target)
            if slot is not None:
                for name, vector in (
                    ("router_bias", request.router_bias),
                    ("mixture_weights", request.mixture_weights),
                ):
                    if vector is not None and len(vector) != len(mixture.adapters):
                        raise ValidationFailed(
                            f"{name} has {len(vector)} values for {len(mixture.adapters)} adapters", param=name
                        )
                return replace(request, target=slot)
        refuse_torch_only(request)
        return request

    async def ensure_server(self, target: Target, *, wait: bool = True) -> str:
        """Start ``target``'s base server if needed; with ``wait``, until it is ready (restarts included).

        Returns the server's URL. Raises ``EngineUnavailable`` if it does not come up (the log tail is in
        ``status()``'s ``last_error``).
        """
        server = await self._fleet.acquire(target, wait=wait, force_wait=wait)
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
        request = await self._slotted(request)
        path, body, chat = payload(request, stream=True)
        server = await self._fleet.acquire(request.target, wait=wait)
        watch = Watch(server)
        events: EventStream | None = None
        try:
            events, _ = await self._adapters.send(
                server, request.target, watch, body, lambda: server.http.open_stream(path, body)
            )
            if events.status_code != 200:
                raise_for_status(await self._fleet.call(server, watch, events.reply()), server)
            parser = StreamParser(server, chat=chat, json_answer=_json_answer(request))
            while (event := await self._fleet.call(server, watch, events.next_event())) is not None:
                for chunk in parser.chunks(event):
                    yield chunk
            if not events.done:
                raise GenerationFailed(f"the vLLM server for {server.base_id!r} ended the stream early")
            yield parser.last()
        finally:
            watch.close()
            if events is not None:
                events.close()

    async def trace(self, request: GenRequest, completion: str = "") -> TokenTrace:
        raise ValidationFailed("the vllm engine cannot trace token-level routes", param="trace")

    async def status(self) -> list[dict[str, Any]]:
        """One entry per server: base_id, url, pid, state (starting|ready|dead|remote), adapters, restarts."""
        for base_id in self.config.remote_servers:  # configured remotes are listed before first use too
            self._fleet.entry(base_id, None, 0)
        return [self._status_entry(server) for server in self._fleet.servers.values()]

    async def forget(self, adapter_id: str, names: Collection[str]) -> None:
        for base_id in self.config.remote_servers:  # remote servers this process has not used yet may hold it too
            self._fleet.entry(base_id, None, 0)
        await self._adapters.forget(adapter_id, names)

    async def stop_server(self, base_id: str) -> None:
        """Terminate one base's managed server (e.g. to free memory); the next request starts it again."""
        await self._fleet.stop_server(base_id)

    async def close(self) -> None:
        """Terminate every managed server (SIGTERM, then SIGKILL) and close their HTTP connections."""
        await self._fleet.close()

    async def _run(self, request: GenRequest, wait: bool) -> GenResult:
        request = await self._slotted(request)
        path, body, chat = payload(request, stream=False)  # invalid input fails before any server starts
        server = await self._fleet.acquire(request.target, wait=wait)
        watch = Watch(server)
        try:
            reply, sent_at = await self._adapters.send(
                server, request.target, watch, body, lambda: server.http.post_json(path, body)
            )
            latency = time.perf_counter() - sent_at
            raise_for_status(reply, server)
            data = reply.json()
        finally:
            watch.close()
        return gen_result(data, chat=chat, model=body["model"], latency_s=latency, json_answer=_json_answer(request))

    def _status_entry(self, server: Server) -> dict[str, Any]:
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
            entry["log"] = str(self._fleet.supervisor.log_path(server))
        return entry


def _json_answer(request: GenRequest) -> bool:
    """The request asked for a JSON answer (response_format), whose text is checked for raw control characters."""
    return request.guidance is not None and request.guidance.structured
