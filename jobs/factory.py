"""The worker `moerge serve`, `moerge worker` and `moerge merge` run: a handler per kind, from settings."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from composition.composer import router_context
from composition.factory import create_engine
from core import metrics
from core.errors import ValidationFailed
from core.settings import Settings
from jobs.fit import FitHandler
from jobs.merge import MergeHandler
from jobs.run import JobHandler
from jobs.train import TrainHandler
from jobs.worker import Worker
from registry.store import ArtifactStore
from routers.query import RouterContext
from serving.engine import Engine


def make_worker(
    sessionmaker: async_sessionmaker[AsyncSession],
    store: ArtifactStore,
    settings: Settings,
    *,
    context: Callable[[], RouterContext] | None = None,
    name: str | None = None,
    kinds: Collection[str] | None = None,
) -> Worker:
    """Merges work in ``settings.merges_dir``, other jobs in ``settings.jobs_dir``; a lease lapses after
    ``settings.merge_stale_after_s``. ``context``: the routers' context for `fit` jobs (the app's, in `moerge
    serve`); a worker without one leaves fit and train jobs to one that has it."""
    metrics.enable(settings.metrics_path)  # a `moerge worker` process's job counts join the gateway's /metrics
    handlers: list[tuple[JobHandler, Path]] = [
        (MergeHandler(sessionmaker, store, max_lora_rank=settings.max_lora_rank), settings.merges_dir)
    ]
    if context is not None:  # fitting, and training (which adds experts to compositions, refitting them)
        handlers.append((FitHandler(sessionmaker, store, context), settings.jobs_dir))
        trainer = TrainHandler(sessionmaker, store, context, max_lora_rank=settings.max_lora_rank)
        handlers.append((trainer, settings.jobs_dir))
    if kinds is not None:  # this worker takes these kinds only (the demo trains in a worker of its own)
        unknown = set(kinds) - {handler.kind for handler, _ in handlers}
        if unknown:
            raise ValidationFailed(f"kinds: this worker cannot run {', '.join(sorted(unknown))} jobs", param="kinds")
        handlers = [(handler, root) for handler, root in handlers if handler.kind in kinds]
    return Worker(sessionmaker, handlers, stale_after_s=settings.merge_stale_after_s, name=name)


class WorkerContext:
    """The routers' context of a `moerge worker` process: the embedder, and a serving engine created on the
    first fit that runs a model (`instruct`, `kshot`, glider's global part), closed with the worker."""

    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore):
        from routers.query.embedder import LazyEmbedder

        self.settings, self.sessionmaker, self.store = settings, sessionmaker, store
        self.embedder = LazyEmbedder(settings.embedding_model, settings.embedding_backend, settings.embedding_cache_mb)
        self.engine: Engine | None = None

    def __call__(self) -> RouterContext:
        return RouterContext(embedder=self.embedder, generate=self._generate)

    async def _generate(self, slug: str, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        if self.engine is None:
            self.engine = await create_engine(self.settings, self.sessionmaker)
        context = router_context(
            self.engine, self.sessionmaker, self.store, self.embedder, max_generation_s=self.settings.max_generation_s
        )
        assert context.generate is not None
        return await context.generate(slug, messages, max_new_tokens)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
            self.engine = None
