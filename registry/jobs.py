"""The jobs table's service: submit, list, get, cancel and describe jobs of every kind (merge, train, fit).

A row is the source of truth for a job; workers (``jobs/worker.py``) claim queued rows and run them. This
module only reads and writes rows: what a kind does lives with the worker's handler for it. A service made
with ``kind`` sees that kind only (``/api/merges`` is ``/api/jobs`` of kind ``merge``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound, ValidationFailed
from registry.models import Expert, Job, JobInput, JobKind, JobStatus, utcnow
from registry.services import find_expert

TERMINAL = frozenset({JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value})
PENDING = (JobStatus.queued.value, JobStatus.running.value)
STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)
KINDS: tuple[str, ...] = tuple(k.value for k in JobKind)


@dataclass
class JobPage:
    items: list[Job]
    total: int
    limit: int
    offset: int


def _label(kind: str | None) -> str:
    """How errors name a job: "merge job" through the merge routes, "job" through the generic ones."""
    return f"{kind} job" if kind else "job"


class JobService:
    def __init__(self, session: AsyncSession, *, kind: str | None = None) -> None:
        if kind is not None and kind not in KINDS:
            raise ValidationFailed(f"kind: {kind!r} is not one of {', '.join(KINDS)}", param="kind")
        self.session = session
        self.kind = kind

    @property
    def _code_prefix(self) -> str:
        return f"{self.kind}_job" if self.kind else "job"

    async def submit(
        self,
        kind: str,
        method: str,
        params: dict[str, Any],
        *,
        result_name: str | None = None,
        inputs: Sequence[tuple[uuid.UUID, float | None]] = (),
        claimed_by: str | None = None,
    ) -> Job:
        """Write a ``queued`` job (``running`` and held by ``claimed_by``: a caller that runs it itself). A
        ``result_name`` another pending job will register is refused (the database's unique index decides a
        race)."""
        if result_name is not None:
            await self.check_result_name_free(result_name)
        now = utcnow()
        job = Job(
            id=uuid.uuid4(),
            kind=kind,
            status=JobStatus.running.value if claimed_by else JobStatus.queued.value,
            method=method,
            result_name=result_name,
            params=params,
            progress=0.0,
            message="starting" if claimed_by else "queued",
            owner=claimed_by,
            attempts=1 if claimed_by else 0,
            heartbeat_at=now if claimed_by else None,
            created_at=now,
            updated_at=now,
            inputs=[JobInput(expert_id=eid, weight=w) for eid, w in inputs],
        )
        self.session.add(job)
        try:
            await self.session.commit()
        except IntegrityError as exc:  # a job submitted at the same moment took the name after our check
            await self.session.rollback()
            raise Conflict(
                f"name: another {_label(kind)} will register {result_name!r}", param="name", code="duplicate_slug"
            ) from exc
        return job

    async def check_result_name_free(self, name: str) -> None:
        if await find_expert(self.session, name) is not None:
            raise Conflict(f"name: an expert named {name!r} already exists", param="name", code="duplicate_slug")
        pending = await self.session.scalar(select(Job).where(Job.result_name == name, Job.status.in_(PENDING)))
        if pending is not None:
            raise Conflict(
                f"name: {_label(pending.kind)} {pending.id} ({pending.status}) will register {name!r}",
                param="name",
                code="duplicate_slug",
            )

    async def get(self, job_id: str | uuid.UUID) -> Job:
        try:
            key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
        except ValueError:
            key = None
        job = await self.session.get(Job, key, populate_existing=True) if key is not None else None
        if job is None or (self.kind is not None and job.kind != self.kind):
            raise NotFound(f"no {_label(self.kind)} {job_id!s}", param="id", code=f"{self._code_prefix}_not_found")
        return job

    async def list_jobs(
        self, *, status: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        if not 1 <= limit <= 500:
            raise ValidationFailed("limit must be between 1 and 500", param="limit")
        if offset < 0:
            raise ValidationFailed("offset must be 0 or more", param="offset")
        if status is not None and status not in STATUSES:
            raise ValidationFailed(f"status: {status!r} is not one of {', '.join(STATUSES)}", param="status")
        if kind is not None and kind not in KINDS:
            raise ValidationFailed(f"kind: {kind!r} is not one of {', '.join(KINDS)}", param="kind")
        where = [Job.status == status] if status else []
        if self.kind is not None or kind is not None:
            where.append(Job.kind == (self.kind or kind))
        total = int(await self.session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)
        query = (
            select(Job)
            .where(*where)
            .order_by(Job.created_at.desc(), Job.id)
            .limit(limit)
            .offset(offset)
            .execution_options(populate_existing=True)
        )
        return JobPage(list(await self.session.scalars(query)), total, limit, offset)

    async def cancel(self, job_id: str | uuid.UUID) -> Job:
        """A queued job is cancelled at once; a running one is asked to stop (its worker reads the flag with
        its next heartbeat and stops at the next point its kind can stop at)."""
        job = await self.get(job_id)
        for _ in range(3):  # the job may start running between our read and our write
            if job.status in TERMINAL:
                raise Conflict(
                    f"{_label(self.kind)} {job.id} is already {job.status}",
                    param="id",
                    code=f"{self._code_prefix}_{job.status}",
                )
            if job.status == JobStatus.queued.value:
                values: dict[str, Any] = {"status": JobStatus.cancelled.value, "message": "cancelled"}
            else:
                values = {"cancel_requested": True, "message": "cancelling"}
            done = await self.session.execute(
                update(Job).where(Job.id == job.id, Job.status == job.status).values(**values, updated_at=utcnow())
            )
            await self.session.commit()
            job = await self.get(job.id)
            if done.rowcount == 1:  # type: ignore[attr-defined]
                return job
        return job

    async def describe(self, job: Job) -> dict[str, Any]:
        return (await self.describe_many([job]))[0]

    async def with_result_slug(self, job: Job) -> tuple[Job, str | None]:
        if job.result_expert_id is None:
            return job, None
        return job, await self.session.scalar(select(Expert.slug).where(Expert.id == job.result_expert_id))

    async def describe_many(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        ids = {j.result_expert_id for j in jobs if j.result_expert_id is not None}
        slugs: dict[uuid.UUID, str] = {}
        if ids:
            slugs = dict((await self.session.execute(select(Expert.id, Expert.slug).where(Expert.id.in_(ids)))).all())
        return [job_summary(j, slugs.get(j.result_expert_id) if j.result_expert_id else None) for j in jobs]


def job_name(job: Job) -> str:
    """The name a job goes by: its result's slug, else the name in its config."""
    return job.result_name or str((job.params.get("config") or {}).get("name") or "")


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()  # SQLite drops the zone


def job_progress(job: Job, result_slug: str | None = None) -> dict[str, Any]:
    """The moving part of a job: what the progress stream sends."""
    return {
        "id": str(job.id),
        "kind": job.kind,
        "status": job.status,
        "progress": round(float(job.progress or 0.0), 4),
        "message": job.message,
        "error": job.error,
        "cancel_requested": bool(job.cancel_requested),
        "result_expert": (
            {"id": str(job.result_expert_id), "slug": result_slug} if job.result_expert_id is not None else None
        ),
        "updated_at": iso(job.updated_at),
        "heartbeat_at": iso(job.heartbeat_at),
    }


def job_summary(job: Job, result_slug: str | None = None) -> dict[str, Any]:
    """The JSON shape of a job for the API and `moerge jobs show` (``object`` is ``merge_job`` for a merge,
    as the merge routes always said)."""
    return {
        "object": "merge_job" if job.kind == JobKind.merge.value else "job",
        **job_progress(job, result_slug),
        "name": job_name(job),
        "method": job.method,
        "created_at": iso(job.created_at),
        "owner": job.owner,
        "attempts": int(job.attempts or 0),
        "result": job.result,
        "config": job.params.get("config"),
        "plan": job.params.get("plan"),
        "inputs": [{"expert_id": str(i.expert_id), "weight": i.weight} for i in job.inputs],
    }
