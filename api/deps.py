"""What handlers get injected: a database session, the artifact store, the registry services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from litestar.datastructures import State
from litestar.di import NamedDependency
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from composition.composer import Composer
from core.errors import MoergeError
from core.settings import Settings
from jobs.worker import Worker
from registry.epoch import StampReader
from registry.services import ApiKeyService, ExpertService
from registry.store import ArtifactStore
from routers.query import RouterContext
from serving.engine import Engine


@dataclass
class Runtime:
    """Long-lived objects of one running app, kept on ``app.state.runtime``."""

    settings: Settings
    db_engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    store: ArtifactStore
    stamps: StampReader
    serving: Engine | None = None
    composer: Composer | None = None  # plans and answers queries (composition/composer.py)
    worker: Worker | None = None  # runs queued jobs in this process (api/app.py starts and stops it)


def runtime_of(state: State) -> Runtime:
    return state.runtime  # type: ignore[no-any-return]


async def provide_session(state: State) -> AsyncIterator[AsyncSession]:
    async with runtime_of(state).sessionmaker() as session:
        yield session


def provide_store(state: State) -> ArtifactStore:
    return runtime_of(state).store


def provide_settings(state: State) -> Settings:
    return runtime_of(state).settings


def provide_expert_service(
    db_session: NamedDependency[AsyncSession],
    store: NamedDependency[ArtifactStore],
    settings: NamedDependency[Settings],
) -> ExpertService:
    return ExpertService(db_session, store, max_lora_rank=settings.max_lora_rank)


def provide_key_service(db_session: NamedDependency[AsyncSession]) -> ApiKeyService:
    return ApiKeyService(db_session)


def provide_composer(state: State) -> Composer:
    """The app's one way to plan and answer a query."""
    composer = runtime_of(state).composer
    if composer is None:
        raise MoergeError("routing is not configured in this app", param="router")
    return composer


def provide_router_context(state: State) -> RouterContext:
    """Embedder + a generate function on this app's engine, for the routers (fitting them)."""
    return provide_composer(state).context


def provide_engine(state: State) -> Engine:
    """The serving engine (vLLM or torch) of this app."""
    engine = runtime_of(state).serving
    if engine is None:
        raise MoergeError("no serving engine is configured in this app", param="engine")
    return engine


def wake_worker(state: State) -> None:
    """A job was queued: this app's worker looks now (else another process's worker takes it)."""
    worker = runtime_of(state).worker
    if worker is not None:
        worker.wake()
