"""/api/health and /api/ready (no key needed), /api/engines and /api/strategies (query key).

What a stranger may see is the least that is useful: health without an admin key says only ``ok`` or
``degraded`` (the status code says the same); the engine's servers without an admin key show their base, state
and adapters, never a pid, a URL, a folder, a log path or a log tail. An admin key gets everything.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency, Provide
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_engine
from api.drain import drain_of
from api.schemas import Engines, Health, Ready, Strategies
from api.security import authorize, bearer_token, require_query
from core.errors import MoergeError
from core.settings import Settings
from registry.db import head_revision
from registry.limits import unservable_adapters
from registry.services import hash_key
from registry.store import ArtifactStore
from serving.engine import Engine

log = logging.getLogger(__name__)

READY_DB_TIMEOUT_S = 2.0  # a probe must answer quickly, even when the database does not

# The fields of an engine's server entry anyone with a query key may read (an allow-list, so a field an engine
# adds later stays admin-only until named here). Not: pid, url, base_dir, log, last_error (it holds the log tail).
PUBLIC_SERVER_FIELDS = (
    "engine",
    "base_id",
    "name",
    "state",
    "adapters",
    "restarts",
    "reachable",
    "startup_s",
    "router",
    "queued",
    "loaded_at",
)


async def is_admin(request: Request[Any, Any, Any]) -> bool:
    """Whether the request carries a valid admin key. Never raises: no key, a wrong key, a key without the
    scope, or a database that cannot check it all mean "no" (health must answer all of them)."""
    secret = bearer_token(request)
    if not secret:
        return False
    try:
        await authorize(request, hash_key(secret), "admin")
    except MoergeError:
        return False
    except Exception:  # the database is down: the key cannot be checked, so it counts as none
        log.warning("health: could not check the key", exc_info=True)
        return False
    return True


def public_server(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k in PUBLIC_SERVER_FIELDS}


class HealthController(Controller):
    path = "/api/health"
    tags = ["system"]

    @get("/")
    async def health(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        settings: NamedDependency[Settings],
    ) -> Response[Health]:
        """``{"status": "ok"|"degraded"}`` (200 or 503); with an admin key, also the checks behind it."""
        checks: dict[str, Any] = {}
        try:
            revision = await db_session.scalar(text("SELECT version_num FROM alembic_version"))
            checks["database"] = {"ok": revision == head_revision(), "revision": revision}
        except Exception as exc:  # report, do not raise: health must answer even when the database does not
            checks["database"] = {"ok": False, "error": type(exc).__name__}
        checks["store"] = {"ok": store.root.is_dir(), "path": str(store.root)}
        ok = all(c["ok"] for c in checks.values())
        status_code = 200 if ok else 503
        status = "ok" if ok else "degraded"
        if not await is_admin(request):
            return Response(Health(status=status), status_code=status_code)
        if checks["database"]["ok"]:
            # Informative, not a health failure: such an adapter is refused per request, with the fix.
            checks["unservable_adapters"] = await unservable_adapters(db_session, settings.max_lora_rank)
        body = Health(
            status=status, version=_version(), checks=checks, database_backend=settings.database_url.split(":", 1)[0]
        )
        return Response(body, status_code=status_code)


class ReadyController(Controller):
    path = "/api/ready"
    tags = ["system"]

    @get("/")
    async def ready(self, request: Request[Any, Any, Any]) -> Response[Ready]:
        """``{"status": "ready"}`` (200) when this replica takes traffic: started (database migrated, engine
        made) and not draining, with its database answering; else 503 with ``starting``, ``draining`` or
        ``database unreachable``. For load balancers and orchestrators; no key needed."""
        phase = drain_of(request.app.state).phase
        runtime = getattr(request.app.state, "runtime", None)
        if phase != "ready" or runtime is None:
            return Response(Ready(status="starting" if phase == "ready" else phase), status_code=503)
        try:
            async with asyncio.timeout(READY_DB_TIMEOUT_S), runtime.db_engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # answer, do not raise: the probe's job is to say so
            log.warning("ready: the database did not answer (%s)", type(exc).__name__)
            return Response(Ready(status="database unreachable"), status_code=503)
        return Response(Ready(status="ready"))


class EngineController(Controller):
    path = "/api/engines"
    tags = ["system"]
    dependencies = {"engine": Provide(provide_engine, sync_to_thread=False)}

    @get("/", guards=[require_query])
    async def engines(self, request: Request[Any, Any, Any], engine: NamedDependency[Engine]) -> Engines:
        """The serving engine and its servers: state and loaded adapters; with an admin key also URL, pid,
        folders, log path and last error (with the log's tail)."""
        servers = await engine.status()
        if "admin" not in request.state.api_key_scopes:
            servers = [public_server(s) for s in servers]
        return Engines(engine=engine.name, servers=servers)


class StrategyController(Controller):
    path = "/api/strategies"
    tags = ["system"]

    @get("/", guards=[require_query])
    async def strategies(self) -> Strategies:
        """The routers, token routers, aggregators and merge methods, each with its help and parameters (name,
        type, default, help): what a composition's or a merge's config may name."""
        return Strategies.listed()


def _version() -> str:
    from importlib.metadata import version

    return version("moerge")
