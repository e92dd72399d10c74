"""Build the engine the settings name. Remote vLLM servers are configured by base slug or id."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import ValidationFailed
from core.settings import Settings
from registry.limits import MAX_LORA_RANK, largest_rank, row_fault
from registry.models import Expert
from registry.services import ExpertService
from registry.store import ArtifactStore
from serving.engine import Engine


async def remote_servers_by_id(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    """MOERGE_VLLM_REMOTE names bases by slug (or id); the engine keys servers by expert id."""
    if not settings.vllm_remote:
        return {}
    remote: dict[str, str] = {}
    async with sessionmaker() as session:
        experts = ExpertService(session, ArtifactStore(settings.store_dir))
        for ref, url in settings.vllm_remote:
            expert = await experts.find(ref)
            if expert is None:
                raise ValidationFailed(
                    f"MOERGE_VLLM_REMOTE names {ref!r}, which is not registered", param="vllm_remote"
                )
            remote[str(expert.id)] = url
    return remote


async def registered_lora_rank(
    sessionmaker: async_sessionmaker[AsyncSession], max_lora_rank: int = MAX_LORA_RANK
) -> int:
    """The largest LoRA rank among registered adapters that can be served (0 if none). A row that cannot
    (a rank above ``max_lora_rank``, values or keys registration now refuses) is left out: it is refused per
    request with the fix, and must never stop the server from starting."""
    async with sessionmaker() as session:
        rows = await session.execute(
            select(Expert.peft_type, Expert.r, Expert.lora_alpha, Expert.rank_pattern, Expert.alpha_pattern).where(
                Expert.peft_type.is_not(None)
            )
        )
        ranks = [largest_rank(row.r, row.rank_pattern) for row in rows if row_fault(row, max_lora_rank) is None]
    return max(ranks, default=0)


async def mixture_lora_rank(sessionmaker: async_sessionmaker[AsyncSession], max_lora_rank: int = MAX_LORA_RANK) -> int:
    """The largest rank of a composition served as one vLLM adapter slot (0 if none): each member's largest rank
    summed, plus a router row per member for a token-level router (``serving/mixture/slot.py``); a ``weighted``
    aggregator's slot has no router rows. Compositions above vLLM's
    largest rank count as that rank: sizing must never stop the start (such a mixture is refused per request)."""
    from composition.mixtures import is_token_level
    from registry.models import Composition, CompositionMember

    async with sessionmaker() as session:
        rows = await session.execute(
            select(
                Composition.id,
                Composition.router,
                Composition.aggregator,
                Expert.r,
                Expert.rank_pattern,
                Expert.lora_alpha,
                Expert.peft_type,
                Expert.alpha_pattern,
            )
            .join(CompositionMember, CompositionMember.composition_id == Composition.id)
            .join(Expert, Expert.id == CompositionMember.expert_id)
            .where(Expert.peft_type.is_not(None))
        )
        slots: dict[object, list[int]] = {}
        routed: set[object] = set()
        for row in rows:
            token_level = is_token_level(row.router)
            if (token_level or row.aggregator == "weighted") and row_fault(row, max_lora_rank) is None:
                slots.setdefault(row.id, []).append(largest_rank(row.r, row.rank_pattern))
                if token_level:
                    routed.add(row.id)
    return max((sum(ranks) + (len(ranks) if i in routed else 0) for i, ranks in slots.items()), default=0)


async def create_engine(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> Engine:
    if settings.engine == "torch":
        from serving.torch_engine import TorchEngine

        return TorchEngine(max_loaded_gib=settings.torch_max_loaded_gib)
    from core.lora import VALID_LORA_RANKS, lora_rank_for
    from serving.vllm import VLLMConfig, VLLMEngine

    # vLLM's CPU LoRA kernels copy each token's adapter weights padded to --max-lora-rank: size it to the
    # adapters registered now (8 at least) rather than a generous default. A larger adapter registered later
    # is refused with a message saying to restart.
    # Capped at vLLM's largest: a limit raised above it must not stop the start either (such adapters are
    # refused per request by the engine).
    registered = await registered_lora_rank(sessionmaker, settings.max_lora_rank)
    if settings.vllm_lora_ops == "grouped":  # token-level compositions then run as one adapter slot each
        registered = max(registered, await mixture_lora_rank(sessionmaker, settings.max_lora_rank))
    rank = lora_rank_for(min(max(8, registered), VALID_LORA_RANKS[-1]))
    config = VLLMConfig(
        max_lora_rank=rank,
        remote_servers=await remote_servers_by_id(settings, sessionmaker),
        kv_cache_gib=settings.vllm_kv_cache_gib,
        max_servers=settings.vllm_max_servers,
        keep_warm_s=settings.vllm_keep_warm_s,
        server_wait_s=settings.vllm_server_wait_s,
        max_model_len=settings.vllm_max_model_len,
        cpu_threads_bind=settings.vllm_cpu_threads_bind,
        lora_ops=settings.vllm_lora_ops,
        compile=settings.vllm_compile,
        compact_json=settings.vllm_compact_json,
        log_dir=settings.home / "logs",
        mixture_dir=settings.home / "mixtures",
        env_passthrough=settings.vllm_env_passthrough,
    )
    from serving.dispatch import EngineSet
    from serving.torch_engine import TorchEngine

    # logit fusion, and mixtures vLLM cannot run as a slot, run in a torch engine beside it (it loads nothing until
    # one is asked for)
    vllm_engine = VLLMEngine(config)
    await vllm_engine.mixtures.prepare()
    return EngineSet(vllm_engine, TorchEngine(max_loaded_gib=settings.torch_max_loaded_gib))
