"""/api/health: liveness plus the state of the database and the store (no key needed)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.di import NamedDependency, Provide
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_engine
from api.security import require_query
from api.settings import Settings
from registry.db import head_revision
from registry.store import ArtifactStore
from serving.engine import Engine


class HealthController(Controller):
    path = "/api/health"
    tags = ["system"]

    @get("/")
    async def health(
        self,
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        settings: NamedDependency[Settings],
    ) -> Response[Any]:
        checks: dict[str, Any] = {}
        try:
            revision = await db_session.scalar(text("SELECT version_num FROM alembic_version"))
            checks["database"] = {"ok": revision == head_revision(), "revision": revision}
        except Exception as exc:  # report, do not raise: health must answer even when the database does not
            checks["database"] = {"ok": False, "error": type(exc).__name__}
        checks["store"] = {"ok": store.root.is_dir(), "path": str(store.root)}
        ok = all(c["ok"] for c in checks.values())
        body = {
            "status": "ok" if ok else "degraded",
            "version": _version(),
            "checks": checks,
            "database_backend": settings.database_url.split(":", 1)[0],
        }
        return Response(body, status_code=200 if ok else 503)


class EngineController(Controller):
    path = "/api/engines"
    tags = ["system"]
    dependencies = {"engine": Provide(provide_engine, sync_to_thread=False)}

    @get("/", guards=[require_query])
    async def engines(self, engine: NamedDependency[Engine]) -> dict[str, Any]:
        """The serving engine and its servers (state, URL, loaded adapters, restarts)."""
        return {"engine": engine.name, "servers": await engine.status()}


def _version() -> str:
    from importlib.metadata import version

    return version("moerge")
