"""Adapter residency on vLLM servers: which adapters each server has loaded, loading one on a request's first use
(``POST /v1/load_lora_adapter``, then the adapter id is the request's ``model``), loading it again when the
server forgot it, restarting a server whose --max-lora-rank is below an adapter's rank, and unloading a deleted
adapter from every server that may hold it.

A remote server fetches adapters itself: the request names the adapter by its registry id, which is bound to the
adapter's content (an expert's files never change under its id; a re-registered slug gets a new id), and the
server's moerge resolver (``resolver/``) downloads it from the registry. Only if that server answers 404 (no
resolver there) is it asked to load the folder by path, which works where it shares moerge's filesystem."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from core import metrics
from core.errors import Unprocessable, ValidationFailed
from core.lora import VALID_LORA_RANKS, largest_rank, lora_rank_for
from serving.engine import EngineUnavailable, GenerationFailed, Target
from serving.vllm_client import PROBE_ERRORS, EventStream, Reply
from serving.vllm_openai import error_message
from serving.vllm_server import ADMIN_HINT, Server, Watch

if TYPE_CHECKING:
    from serving.vllm_fleet import Fleet

log = logging.getLogger(__name__)

Answer = TypeVar("Answer", Reply, EventStream)

# What ``Server.adapters`` records for an adapter a remote server's resolver fetched (there is no path to it).
BY_RESOLVER = "(moerge resolver)"
UNLOAD_TIMEOUT_S = 10.0


class Adapters:
    """Loads adapters into the servers of ``fleet`` as requests need them."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def send(
        self,
        server: Server,
        target: Target,
        watch: Watch,
        body: dict[str, Any],
        exchange: Callable[[], Awaitable[Answer]],
    ) -> tuple[Answer, float]:
        """Send ``body`` (``exchange()``) with its ``model`` set to ``target``'s, its adapter loaded first if need
        be. A 404 for an adapter means the server forgot it (restarted behind our back), or a remote server has no
        resolver: it is loaded by path and sent again, once. Returns the answer and the ``time.perf_counter()`` at
        which it was sent."""
        for attempt in range(2):
            body["model"] = await self.model_for(server, target, watch, by_path=attempt > 0)
            sent_at = time.perf_counter()
            answer = await self._fleet.call(server, watch, exchange())
            if answer.status_code == 404 and target.adapter_id and attempt == 0:
                if isinstance(answer, EventStream):
                    answer.close()
                server.adapters.pop(target.adapter_id, None)
                continue
            break
        if (
            server.remote
            and target.adapter_id
            and answer.status_code == 200
            and target.adapter_id not in server.adapters
        ):
            server.adapters[target.adapter_id] = BY_RESOLVER  # its resolver fetched and loaded it (or had it)
            metrics.ADAPTER_LOADS.labels(base=server.base_id, where="remote").inc()
        return answer, sent_at

    async def model_for(self, server: Server, target: Target, watch: Watch, *, by_path: bool = False) -> str:
        """The request's ``model``: the base's served name, or the adapter id after loading it (once). A remote
        server gets the id as it is (its resolver fetches the adapter) unless ``by_path``."""
        adapter_id = target.adapter_id
        if adapter_id is None:
            return server.model_name
        if adapter_id in server.adapters or (server.remote and not by_path):
            return adapter_id
        if target.adapter_dir is None:
            raise ValidationFailed(f"adapter {adapter_id!r} has no folder to load", param="model")
        adapter_path = str(Path(target.adapter_dir).resolve()) if not server.remote else str(target.adapter_dir)
        if not server.remote:
            rank = adapter_rank(Path(adapter_path))
            if rank is not None and rank > server.started_rank:
                await self.restart_for_rank(server, target, adapter_id, rank)
        lock = server.adapter_locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:  # concurrent first requests for one adapter load it once
            if adapter_id not in server.adapters:
                await self._load(server, adapter_id, adapter_path, watch, target.served_name or adapter_id)
        return adapter_id

    async def _load(self, server: Server, adapter_id: str, adapter_path: str, watch: Watch, name: str) -> None:
        epoch = server.epoch
        body = {"lora_name": adapter_id, "lora_path": adapter_path}
        reply = await self._fleet.call(server, watch, server.http.post_json("/v1/load_lora_adapter", body))
        # "already been loaded": another engine (remote mode) or an earlier attempt loaded it; fine.
        if reply.status_code != 200 and not (reply.status_code == 400 and "already" in reply.text):
            log.warning(
                "vLLM for %s could not load adapter %s from %s: %s",
                server.base_id,
                adapter_id,
                adapter_path,
                error_message(reply),
            )
            where = (
                " (it has no moerge resolver that fetches it, and moerge's folder of it is not visible there: "
                "install moerge-vllm-resolver on that server, see the README)"
                if server.remote
                else ""
            )
            raise GenerationFailed(
                f"the vLLM server for {server.base_id!r} could not load adapter {name!r}{where}; " + ADMIN_HINT,
                param="model",
            )
        if server.epoch == epoch:  # not a load answered by a process that has since been replaced
            server.adapters[adapter_id] = adapter_path
            metrics.ADAPTER_LOADS.labels(base=server.base_id, where="remote" if server.remote else "local").inc()

    async def forget(self, adapter_id: str, names: Collection[str]) -> None:
        """Unload a deleted adapter from every server that may hold it: managed servers that loaded it, and every
        remote server under any name its resolver may have given it (the id, its slug or aliases, ``slug@sha``).
        A server that cannot be reached is logged, not an error: the deletion has happened."""
        unloads = []
        remote_urls: set[str] = set()
        for server in list(self._fleet.servers.values()):
            if server.remote and server.url not in remote_urls:
                remote_urls.add(server.url)
                unloads.append(self._forget_remote(server, adapter_id, names))
            elif not server.remote and adapter_id in server.adapters and server.client is not None:
                unloads.append(self._unload(server, [adapter_id]))
        await asyncio.gather(*unloads)

    async def _forget_remote(self, server: Server, adapter_id: str, names: Collection[str]) -> None:
        try:
            served = await server.http.models(timeout_s=UNLOAD_TIMEOUT_S)
        except PROBE_ERRORS as exc:
            log.warning(
                "could not list the adapters of the vLLM server at %s to unload %s: %r", server.url, adapter_id, exc
            )
            return
        held = [
            entry["id"]
            for entry in served
            if isinstance(entry, dict)
            and isinstance(entry.get("id"), str)
            and (entry["id"] == adapter_id or entry["id"] in names or entry["id"].split("@", 1)[0] in names)
            and entry.get("parent")  # adapters have a parent (the base); never unload a base
        ]
        await self._unload(server, held)

    async def _unload(self, server: Server, lora_names: list[str]) -> None:
        for name in lora_names:
            try:
                reply = await asyncio.wait_for(
                    server.http.post_json("/v1/unload_lora_adapter", {"lora_name": name}), UNLOAD_TIMEOUT_S
                )
            except PROBE_ERRORS as exc:
                log.warning("could not unload adapter %s from the vLLM server at %s: %r", name, server.url, exc)
                continue
            server.adapters.pop(name, None)
            if reply.status_code not in (200, 404):  # 404: it was not loaded there (any more)
                log.warning("vLLM at %s did not unload adapter %s: %s", server.url, name, error_message(reply))
            else:
                log.info("unloaded deleted adapter %s from the vLLM server for %s", name, server.base_id)

    async def restart_for_rank(self, server: Server, target: Target, adapter_id: str, rank: int) -> None:
        """An adapter above the running server's --max-lora-rank (a merged LoRA, say): restart the server
        with a rank that fits once it is idle, and tell the caller to come back (EngineUnavailable)."""
        server.rank = max(server.rank, served_rank(rank, target))  # every later start keeps it
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
        await self._fleet.supervisor.stop(server)
        server.stopping = False
        try:
            await self._fleet.acquire(target, wait=False)
        except EngineUnavailable as exc:
            raise EngineUnavailable(
                f"restarting the vLLM server for {server.base_id!r} with --max-lora-rank {server.rank} for adapter "
                f"{adapter_id!r} (rank {rank})",
                retry_after=exc.retry_after,
            ) from None


def adapter_rank(adapter_dir: Path) -> int | None:
    """Largest LoRA rank in a PEFT adapter_config.json (r and any integer rank_pattern value), if readable.
    Anything else in it is registration's to refuse (registry/limits.py), not a reason to fail here."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    return largest_rank(cfg.get("r"), cfg.get("rank_pattern")) or None


def served_rank(rank: int, target: Target) -> int:
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
