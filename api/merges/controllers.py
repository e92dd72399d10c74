"""/api/merges: submit a merge (JSON or mergekit-style YAML), list, get, cancel, and follow its progress."""

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
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import Runtime, runtime_of
from api.openai.controllers import SSE_HEADERS
from api.schemas import MergeJobOut, Page, job_out, jobs_out
from api.security import require_admin, require_query
from merging.jobs import TERMINAL, MergeJobService, job_progress
from registry.models import MergeJob
from registry.store import ArtifactStore

YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
EVENTS_POLL_S = 0.25
KEEPALIVE_S = 15.0


def _service(db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]) -> MergeJobService:
    return MergeJobService(db_session, store)


async def submit_job(
    merges: MergeJobService, state: State, raw: bytes | dict[str, Any], *, yaml_text: bool = False
) -> MergeJob:
    """Check and queue a merge, then wake this app's runner (the API and the admin panel's launcher)."""
    job = await merges.submit(raw, yaml_text=yaml_text)
    runner = runtime_of(state).merges
    if runner is not None:  # else another worker (a durable queue) takes it
        runner.wake()
    return job


class MergeController(Controller):
    path = "/api/merges"
    tags = ["merges"]
    dependencies = {"merges": Provide(_service, sync_to_thread=False)}

    @post("/", guards=[require_admin], status_code=HTTP_201_CREATED)
    async def submit(
        self,
        request: Request[Any, Any, Any],
        merges: NamedDependency[MergeJobService],
    ) -> MergeJobOut:
        """Check the merge completely (4xx naming the field, nothing written), then queue it."""
        yaml_text = request.content_type[0] in YAML_TYPES
        job = await submit_job(merges, request.app.state, await request.body(), yaml_text=yaml_text)
        return await job_out(merges, job)

    @get("/", guards=[require_query])
    async def list_jobs(
        self,
        merges: NamedDependency[MergeJobService],
        status: FromQuery[str | None] = None,
        limit: FromQuery[int] = 50,
        offset: FromQuery[int] = 0,
    ) -> Page[MergeJobOut]:
        page = await merges.list_jobs(status=status, limit=limit, offset=offset)
        data = await jobs_out(merges, page.items)
        return Page(data=data, total=page.total, limit=page.limit, offset=page.offset)

    @get("/{job_id:str}", guards=[require_query])
    async def get_job(self, job_id: FromPath[str], merges: NamedDependency[MergeJobService]) -> MergeJobOut:
        return await job_out(merges, await merges.get(job_id))

    @post("/{job_id:str}/cancel", guards=[require_admin], status_code=HTTP_200_OK)
    async def cancel(self, job_id: FromPath[str], merges: NamedDependency[MergeJobService]) -> MergeJobOut:
        """A queued job is cancelled at once; a running one stops at its next tensor (409 once finished)."""
        return await job_out(merges, await merges.cancel(job_id))

    @get("/{job_id:str}/events", guards=[require_query])
    async def events(
        self, job_id: FromPath[str], merges: NamedDependency[MergeJobService], state: State
    ) -> Response[Any]:
        """Server-sent events: `data: {"status", "progress", "message", ...}` on every change, ending after
        the job's terminal status."""
        job = await merges.get(job_id)  # 404 before the stream starts
        await merges.session.close()  # the stream reads with its own sessions
        return Stream(_job_events(runtime_of(state), job.id), media_type="text/event-stream", headers=SSE_HEADERS)


async def _job_events(runtime: Runtime, job_id: uuid.UUID) -> AsyncIterator[str]:
    last: dict[str, Any] | None = None
    quiet = 0.0
    while True:
        async with runtime.sessionmaker() as session:
            service = MergeJobService(session, runtime.store)
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
