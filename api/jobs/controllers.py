"""/api/jobs: every long task (merge, train, fit): list, get, cancel, and follow its progress (SSE).

``JobRoutes`` holds the routes; ``JobController`` serves them for every kind at /api/jobs and
``api/merges/controllers.py`` for merges at /api/merges (the older paths, kept as aliases).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import Runtime, runtime_of, wake_worker
from api.openai.controllers import SSE_HEADERS
from api.schemas import JobOut, Page, PageLimit, PageOffset, job_out, jobs_out
from api.security import require_admin, require_query
from jobs.train import submit_training
from registry.jobs import TERMINAL, JobService, job_progress
from registry.store import ArtifactStore

EVENTS_POLL_S = 0.25
KEEPALIVE_S = 15.0


def _service(db_session: NamedDependency[AsyncSession]) -> JobService:
    return JobService(db_session)


class JobRoutes(Controller):
    """The routes over the jobs a ``jobs`` dependency (a ``JobService``) sees."""

    @get("/", guards=[require_query])
    async def list_jobs(
        self,
        jobs: NamedDependency[JobService],
        status: FromQuery[str | None] = None,
        kind: FromQuery[str | None] = None,
        limit: PageLimit = 50,
        offset: PageOffset = 0,
    ) -> Page[JobOut]:
        """Newest first; ``status`` and ``kind`` (merge, train, fit) filter."""
        page = await jobs.list_jobs(status=status, kind=kind, limit=limit, offset=offset)
        return Page(data=await jobs_out(jobs, page.items), total=page.total, limit=page.limit, offset=page.offset)

    @get("/{job_id:str}", guards=[require_query])
    async def get_job(self, job_id: FromPath[str], jobs: NamedDependency[JobService]) -> JobOut:
        return await job_out(jobs, await jobs.get(job_id))

    @post("/{job_id:str}/cancel", guards=[require_admin], status_code=HTTP_200_OK)
    async def cancel(self, job_id: FromPath[str], jobs: NamedDependency[JobService]) -> JobOut:
        """A queued job is cancelled at once; a running one stops at its next chance (409 once finished)."""
        return await job_out(jobs, await jobs.cancel(job_id))

    @get("/{job_id:str}/events", guards=[require_query])
    async def events(self, job_id: FromPath[str], jobs: NamedDependency[JobService], state: State) -> Response[Any]:
        """Server-sent events: `data: {"status", "progress", "message", ...}` on every change, ending after
        the job's terminal status."""
        job = await jobs.get(job_id)  # 404 before the stream starts
        await jobs.session.close()  # the stream reads with its own sessions
        return Stream(
            _job_events(runtime_of(state), job.id, jobs.kind), media_type="text/event-stream", headers=SSE_HEADERS
        )


class JobController(JobRoutes):
    path = "/api/jobs"
    tags = ["jobs"]
    dependencies = {"jobs": Provide(_service, sync_to_thread=False)}

    @post("/train", guards=[require_admin], status_code=HTTP_202_ACCEPTED)
    async def train(
        self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService], store: NamedDependency[ArtifactStore]
    ) -> JobOut:
        """Queue a `train` job: ``{"recipe", "base", "expert": {"slug", ...card fields}, "params", "add_to"}``
        (recipe ``lora-sft``: ``params.data`` is ``{"rows": [{"prompt", "answer"}, ...]}`` or ``{"source":
        name, "examples": n}``, ``params.recipe`` the LoRA recipe's fields). Checked completely first."""
        job = await submit_training(jobs.session, store, await request.body())
        wake_worker(request.app.state)
        return await job_out(jobs, job)


async def _job_events(runtime: Runtime, job_id: uuid.UUID, kind: str | None) -> AsyncIterator[str]:
    last: dict[str, Any] | None = None
    quiet = 0.0
    while True:
        async with runtime.sessionmaker() as session:
            service = JobService(session, kind=kind)
            event = job_progress(*(await service.with_result_slug(await service.get(job_id))))
        moving = {k: v for k, v in event.items() if k not in ("updated_at", "heartbeat_at")}
        if moving != last:
            last = moving
            quiet = 0.0
            yield f"data: {json.dumps(event)}\n\n"
        elif quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"
        if event["status"] in TERMINAL:
            return
        await asyncio.sleep(EVENTS_POLL_S)
        quiet += EVENTS_POLL_S
