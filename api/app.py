"""The Litestar application: /api (native) now; /v1 (OpenAI-compatible) and /admin join it later."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from api.deps import Runtime, provide_key_service, provide_session, provide_settings, provide_store
from api.exceptions import exception_handlers
from api.experts.controllers import ExpertController
from api.settings import Settings
from api.system.controllers import HealthController
from registry.db import ensure_migrated, make_engine, make_sessionmaker
from registry.store import ArtifactStore


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        try:
            await ensure_migrated(engine)  # refuse to serve on an unmigrated or out-of-date database
            store = ArtifactStore(settings.store_dir)
            store.ensure()
            app.state.runtime = Runtime(settings, engine, make_sessionmaker(engine), store)
            yield
        finally:
            await engine.dispose()

    return Litestar(
        route_handlers=[HealthController, ExpertController],
        dependencies={
            "db_session": Provide(provide_session),
            "store": Provide(provide_store, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "keys": Provide(provide_key_service, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.max_upload_bytes,
        openapi_config=OpenAPIConfig(title="moerge", version="0.1.0", path="/api/schema"),
    )
