"""/api/merges: submit a merge (JSON or mergekit-style YAML); list, get, cancel and follow merges as at
/api/jobs (``api/jobs/controllers.py``), for the jobs of kind ``merge``."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.status_codes import HTTP_201_CREATED
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import wake_worker
from api.jobs.controllers import JobRoutes
from api.schemas import JobOut, job_out
from api.security import require_admin
from merging.jobs import MergeJobService
from registry.models import Job
from registry.store import ArtifactStore

YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


def _service(db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]) -> MergeJobService:
    return MergeJobService(db_session, store)


async def submit_job(
    merges: MergeJobService, state: State, raw: bytes | dict[str, Any], *, yaml_text: bool = False
) -> Job:
    """Check and queue a merge, then wake this app's worker (the API and the admin panel's launcher)."""
    job = await merges.submit_merge(raw, yaml_text=yaml_text)
    wake_worker(state)
    return job


class MergeController(JobRoutes):
    path = "/api/merges"
    tags = ["merges"]
    dependencies = {"jobs": Provide(_service, sync_to_thread=False)}

    @post("/", guards=[require_admin], status_code=HTTP_201_CREATED)
    async def submit(self, request: Request[Any, Any, Any], jobs: NamedDependency[MergeJobService]) -> JobOut:
        """Check the merge completely (4xx naming the field, nothing written), then queue it."""
        yaml_text = request.content_type[0] in YAML_TYPES
        job = await submit_job(jobs, request.app.state, await request.body(), yaml_text=yaml_text)
        return await job_out(jobs, job)
