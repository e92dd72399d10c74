"""The dashboard: experts by kind, the serving engine's servers, the latest merge jobs."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.response import Template
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import runtime_of
from merging.jobs import MergeJobService
from registry.models import ExpertKind
from registry.services import ExpertService
from registry.store import ArtifactStore

RECENT_JOBS = 8
REFRESH_S = 5  # how often an open dashboard fetches its counts, servers and jobs again


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
        merges = MergeJobService(db_session, store)
        jobs = await merges.describe_many((await merges.list_jobs(limit=RECENT_JOBS)).items)
        serving = runtime_of(request.app.state).serving
        servers = await serving.status() if serving is not None else []
        return Template(
            "dashboard.html",
            context={
                "counts": [(kind.value, counts.get(kind.value, 0)) for kind in ExpertKind],
                "total": sum(counts.values()),
                "engine": serving.name if serving is not None else None,
                "servers": servers,
                "jobs": jobs,
                "refresh_s": REFRESH_S,
            },
        )
