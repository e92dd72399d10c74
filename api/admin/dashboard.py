"""The dashboard: experts by kind, the serving engine's servers, the latest merge jobs, and the last hour's
traffic (requests and latency per model, each composition's routing share) from the per-minute rollups."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.response import Template
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin.activity import WINDOW_MIN, activity
from api.deps import runtime_of
from api.schemas import jobs_out
from registry.jobs import JobService
from registry.metrics import minute_of, recent_minutes
from registry.models import Expert, ExpertKind
from registry.services import ExpertService
from registry.store import ArtifactStore

SERVER_ID_FIELDS = ("name", "base_id")  # status fields an engine fills with an expert's id


async def _with_slugs(db_session: AsyncSession, servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Engines report bases and adapters by id; the dashboard shows their slugs (unknown ids stay)."""
    ids: set[uuid.UUID] = set()
    for server in servers:
        for value in [*(server.get(f) for f in SERVER_ID_FIELDS), *(server.get("adapters") or [])]:
            with contextlib.suppress(TypeError, ValueError):
                ids.add(uuid.UUID(str(value)))
    if not ids:
        return servers
    slugs = {
        str(i): slug for i, slug in (await db_session.execute(select(Expert.id, Expert.slug).where(Expert.id.in_(ids))))
    }

    def named(value: Any) -> Any:
        return slugs.get(str(value), value)

    return [
        {
            **server,
            **{f: named(server[f]) for f in SERVER_ID_FIELDS if f in server},
            "adapters": [named(a) for a in server.get("adapters") or []],
        }
        for server in servers
    ]


RECENT_JOBS = 8
REFRESH_S = 5  # how often an open dashboard fetches its counts, servers and jobs again
ACTIVITY_REFRESH_S = 60  # and its traffic charts (their rows are written about once a minute)


class DashboardPage(Controller):
    path = "/admin"

    @get("/")
    async def dashboard(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
    ) -> Template:
        counts = await ExpertService(db_session, store).count_by_kind()
        service = JobService(db_session)
        running = (await service.list_jobs(status="running", limit=RECENT_JOBS)).items
        recent = [j for j in (await service.list_jobs(limit=RECENT_JOBS)).items if j.status != "running"]
        jobs = await jobs_out(service, [*running, *recent][: max(RECENT_JOBS, len(running))])
        serving = runtime_of(request.app.state).serving
        servers = await _with_slugs(db_session, await serving.status()) if serving is not None else []
        now = minute_of()
        models, routes = await recent_minutes(db_session, now - WINDOW_MIN + 1)
        return Template(
            "dashboard.html",
            context={
                "counts": [(kind.value, counts.get(kind.value, 0)) for kind in ExpertKind],
                "total": sum(counts.values()),
                "engine": serving.name if serving is not None else None,
                "servers": servers,
                "jobs": jobs,
                "refresh_s": REFRESH_S,
                "activity": activity(models, routes, now),
                "activity_refresh_s": ACTIVITY_REFRESH_S,
            },
        )
