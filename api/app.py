"""The Litestar application: /api (native), /v1 (OpenAI-compatible) and the /admin panel."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.logging.config import LoggingConfig
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from api.admin import admin_plugins, admin_router, template_config
from api.compositions.controllers import CompositionController, RouteController
from api.deps import Runtime, provide_key_service, provide_session, provide_settings, provide_store
from api.disconnect import CancelOnDisconnectMiddleware
from api.drain import Drain, DrainMiddleware
from api.exceptions import exception_handlers
from api.experts.controllers import ExpertController
from api.experts.files import ExpertFilesController
from api.jobs.controllers import JobController
from api.keys.controllers import KeyController
from api.limits import BodyLimitMiddleware, close_if_body_unread
from api.merges.controllers import MergeController
from api.metrics.controllers import MetricsController
from api.metrics.lifespan import metrics_lifespan
from api.metrics.middleware import MetricsMiddleware
from api.openai.controllers import OpenAIController
from api.openai.responses.controllers import ResponsesController
from api.security import key_meter_lifespan
from api.system.controllers import EngineController, HealthController, ReadyController, StrategyController
from api.tracing import tracing_middleware, tracing_plugins
from composition.composer import Composer, router_context
from composition.factory import create_engine
from core.settings import Settings
from core.tracing import setup_tracing
from evals.sources import install_example_sources
from jobs.factory import make_worker
from registry.db import ensure_migrated, make_engine, make_sessionmaker
from registry.epoch import StampReader
from registry.services import ExpertService
from registry.store import ArtifactStore
from routers.query.embedder import LazyEmbedder
from serving.engine import Engine

log = logging.getLogger("moerge")


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    worker: bool = True,
    worker_kinds: Collection[str] | None = None,
    console_logging: bool = True,
) -> Litestar:
    """The app. ``engine`` overrides the one the settings name (tests pass a TorchEngine on tiny models);
    ``worker``: run queued jobs in this process (else only `moerge worker` processes run them), of
    ``worker_kinds`` only if given. ``console_logging=False``: the root logger is left as the caller set it (the
    demo keeps library lines in its log file)."""
    settings = settings or Settings.from_env()
    setup_tracing()  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set (once per process; api/tracing.py)
    install_example_sources()  # the demo's tasks, named by `mixer`'s `task`
    drain = Drain(settings.drain_s)  # ready once every lifespan has run; `moerge serve` drains it on SIGTERM

    def lifespan(app: Litestar) -> AbstractAsyncContextManager[None]:
        return _runtime(app, settings, engine, worker_kinds if worker else None, worker=worker)

    return Litestar(
        route_handlers=[
            HealthController,
            ReadyController,
            ExpertController,
            ExpertFilesController,
            CompositionController,
            RouteController,
            MergeController,
            JobController,
            OpenAIController,
            ResponsesController,
            EngineController,
            StrategyController,
            KeyController,
            MetricsController,
            *admin_router(settings),
        ],
        dependencies={
            "db_session": Provide(provide_session),
            "store": Provide(provide_store, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "keys": Provide(provide_key_service, sync_to_thread=False),
        },
        # The key meter and the metrics' rollups need the runtime the first one makes; the drain's comes last:
        # ready once all have run.
        lifespan=[lifespan, key_meter_lifespan, metrics_lifespan, drain.lifespan],
        state=State({"drain": drain}),
        template_config=template_config(),
        plugins=[*admin_plugins(), *tracing_plugins()],
        exception_handlers=exception_handlers,
        # Every body is bounded before it is read (api/limits.py): max_json_bytes, or for an upload route
        # max_upload_bytes once its caller is authenticated. Litestar's own limit is the backstop.
        middleware=[
            MetricsMiddleware,  # counts and times every request, a draining replica's refusals too
            *tracing_middleware(),  # only names the request's span by its route
            DefineMiddleware(DrainMiddleware, drain=drain),  # outermost: a draining replica refuses first
            DefineMiddleware(
                BodyLimitMiddleware,
                max_json_bytes=settings.max_json_bytes,
                max_upload_bytes=settings.max_upload_bytes,
            ),
            CancelOnDisconnectMiddleware,  # innermost: sees the body as the handler does
        ],
        before_send=[close_if_body_unread],
        request_max_body_size=settings.max_json_bytes,
        openapi_config=OpenAPIConfig(title="moerge", version="0.1.0", path="/api/schema"),
        logging_config=LoggingConfig() if console_logging else LoggingConfig(configure_root_logger=False),
    )


@asynccontextmanager
async def _runtime(
    app: Litestar, settings: Settings, engine: Engine | None, worker_kinds: Collection[str] | None, *, worker: bool
) -> AsyncIterator[None]:
    """The app's long-lived objects (``app.state.runtime``), made at start-up and closed at shutdown."""
    db_engine = make_engine(settings.database_url)
    try:
        await ensure_migrated(db_engine)  # refuse to serve on an unmigrated or out-of-date database
        store = ArtifactStore(settings.store_dir)
        store.ensure()
        sessionmaker = make_sessionmaker(db_engine)
        async with sessionmaker() as session:
            swept = await ExpertService(session, store).sweep_store(min_age_s=settings.store_orphan_age_s)
        if swept:
            log.warning("removed %d leftovers of interrupted writes from the store", len(swept))
        serving = engine or await create_engine(settings, sessionmaker)
        routing = router_context(
            serving,
            sessionmaker,
            store,
            LazyEmbedder(settings.embedding_model, settings.embedding_backend, settings.embedding_cache_mb),
            max_generation_s=settings.max_generation_s,
        )
        composer = Composer(
            serving,
            store,
            routing,
            max_lora_rank=settings.max_lora_rank,
            max_generation_s=settings.max_generation_s,
        )
        stamps = StampReader(settings.database_url)
        jobs = (
            make_worker(sessionmaker, store, settings, context=lambda: routing, kinds=worker_kinds) if worker else None
        )
        app.state.runtime = Runtime(settings, db_engine, sessionmaker, store, stamps, serving, composer, jobs)
        try:
            if jobs is not None:
                await jobs.start()  # settles jobs a dead worker left, then takes queued ones
            yield
        finally:
            if jobs is not None:
                await jobs.stop()  # a job in progress stops at its next chance and is re-queued
            stamps.close()
            if engine is None:  # an engine passed in belongs to the caller
                await serving.close()
    finally:
        await db_engine.dispose()
