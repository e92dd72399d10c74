"""Adapter residency on vLLM servers: which adapters each server has loaded, loading one on a request's first use
(``POST /v1/load_lora_adapter``, then the adapter id is the request's ``model``), loading it again when the
server forgot it, and restarting a server whose --max-lora-rank is below an adapter's rank."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from core.errors import Unprocessable, ValidationFailed
from core.lora import VALID_LORA_RANKS, largest_rank, lora_rank_for
from serving.engine import EngineUnavailable, GenerationFailed, Target
from serving.vllm_client import EventStream, Reply
from serving.vllm_openai import error_message
from serving.vllm_server import ADMIN_HINT, Server, Watch

if TYPE_CHECKING:
    from serving.vllm_fleet import Fleet

log = logging.getLogger(__name__)

Answer = TypeVar("Answer", Reply, EventStream)


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
        be. A 404 for an adapter means the server forgot it (restarted behind our back): it is loaded and sent
        again, once. Returns the answer and the ``time.perf_counter()`` at which it was sent."""
        for attempt in range(2):
            body["model"] = await self.model_for(server, target, watch)
            sent_at = time.perf_counter()
            answer = await self._fleet.call(server, watch, exchange())
            if answer.status_code == 404 and target.adapter_id and attempt == 0:
                if isinstance(answer, EventStream):
                    answer.close()
                server.adapters.pop(target.adapter_id, None)
                continue
            break
        return answer, sent_at

    async def model_for(self, server: Server, target: Target, watch: Watch) -> str:
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
            rank = adapter_rank(Path(adapter_path))
            if rank is not None and rank > server.started_rank:
                await self.restart_for_rank(server, target, adapter_id, rank)
        lock = server.adapter_locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:  # concurrent first requests for one adapter load it once
            if adapter_id not in server.adapters:
                await self._load(server, adapter_id, adapter_path, watch)
        return adapter_id

    async def _load(self, server: Server, adapter_id: str, adapter_path: str, watch: Watch) -> None:
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
            where = " (its folder must be visible to the remote server, same path)" if server.remote else ""
            raise GenerationFailed(
                f"the vLLM server for {server.base_id!r} could not load adapter {adapter_id!r}{where}; " + ADMIN_HINT,
                param="model",
            )
        if server.epoch == epoch:  # not a load answered by a process that has since been replaced
            server.adapters[adapter_id] = adapter_path

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
