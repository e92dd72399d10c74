"""Merge jobs: a database row is the source of truth, a runner does the work.

``MergeJobService`` takes a request (JSON or mergekit-style YAML), checks it completely (method and
parameters, every named expert registered, the inputs compatible: ``merging/plan.py``) and only then
writes a ``queued`` row. A ``MergeRunner`` runs queued jobs; ``InProcessRunner`` is the default one, run by
the app's lifespan (or driven directly by ``moerge merge``). It claims a job with a conditional UPDATE
(queued -> running, so two workers never run one job), rebuilds the plan from the row, runs the streaming
executor in a thread into ``<merges_dir>/<job id>`` and, from the event loop, writes progress and a
heartbeat about twice a second and reads the cancel flag. The merged folder is registered as a ``merged``
expert in the same transaction that marks the job succeeded, so there is never an expert without a
finished job or a finished job without its expert.

A worker that dies mid-job leaves a ``running`` row whose heartbeat goes stale: any runner's recovery marks
it ``failed`` (a merge that killed its worker, out of memory say, would kill the next one too; it is
submitted again by hand) and removes the output it left. A runner stopped cleanly (the server shuts down)
re-queues its job instead: nothing was wrong with it, and the next start runs it again from the beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import msgspec
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import Conflict, MoergeError, NotFound, ValidationFailed
from core.settings import Settings
from merging.config import CheckedRequest, MergeRequest, check_request, parse_request
from merging.executor import ExecutorOptions, MergeCancelled, execute
from merging.plan import MergePlan, ModelRef, plan_merge
from registry.limits import MAX_LORA_RANK
from registry.models import Expert, ExpertKind, MergeJob, MergeJobInput, MergeJobStatus, utcnow
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from registry.store import ArtifactStore

log = logging.getLogger("moerge.merges")

TERMINAL = frozenset({MergeJobStatus.succeeded.value, MergeJobStatus.failed.value, MergeJobStatus.cancelled.value})
STATUSES: tuple[str, ...] = tuple(s.value for s in MergeJobStatus)
MERGE_SHARE = 0.95  # of the progress bar; registering the result (hashing, storing) takes the rest
HEARTBEAT_S = 0.5
STALE_AFTER_S = 30.0  # a running job whose heartbeat is older than this has lost its worker

TickFn = Callable[[float, str], None]  # (progress 0..1, message), about every heartbeat


# -- the service: submit, list, get, cancel, describe --------------------------------------------------


@dataclass
class JobPage:
    items: list[MergeJob]
    total: int
    limit: int
    offset: int


@dataclass
class ResolvedMerge:
    """A checked request with its experts found and its plan made."""

    plan: MergePlan
    base: Expert | None
    inputs: list[Expert]

    def lineage_base(self) -> uuid.UUID | None:
        """The base the merged expert records: the plan's base (or that model's own base when it is a
        finetune), else the one base all inputs share."""
        if self.base is not None:
            return self.base.base_id or self.base.id
        bases = {e.base_id for e in self.inputs}
        return bases.pop() if len(bases) == 1 else None

    def parents(self) -> list[str]:
        experts = [self.base, *self.inputs] if self.base is not None else self.inputs
        return list(dict.fromkeys(str(e.id) for e in experts))


class MergeJobService:
    def __init__(self, session: AsyncSession, store: ArtifactStore) -> None:
        self.session = session
        self.store = store

    async def submit(
        self, raw: bytes | str | dict[str, Any], *, yaml_text: bool = False, claim: bool = False
    ) -> MergeJob:
        """Check the request completely, then write the job (``queued``; ``running`` and claimed by the
        caller with ``claim``, as ``moerge merge`` does). Nothing is written when a check fails."""
        checked = check_request(parse_request(raw, yaml_text=yaml_text))
        resolved = await self.resolve(checked)
        job_id = uuid.uuid4()
        request = checked.request
        name = request.name or f"{checked.method.name}-{job_id.hex[:8]}"
        await self._check_name_free(name)
        config = msgspec.to_builtins(msgspec.structs.replace(request, name=name))
        params = {
            "config": config,
            "plan": resolved.plan.summary(),
            # The experts as found now: a later rename or new alias does not change what this job merges.
            "resolved": {
                "base_model": str(resolved.base.id) if resolved.base is not None else None,
                "models": [str(e.id) for e in resolved.inputs],
            },
        }
        weights: dict[uuid.UUID, float | None] = {}
        for expert, parameters in zip(resolved.inputs, checked.input_parameters, strict=True):
            weight = parameters.get("weight")
            weights.setdefault(expert.id, float(weight) if isinstance(weight, int | float) else None)
        if resolved.base is not None:
            weights.setdefault(resolved.base.id, None)
        now = utcnow()
        job = MergeJob(
            id=job_id,
            status=MergeJobStatus.running.value if claim else MergeJobStatus.queued.value,
            method=checked.method.name,
            result_name=name,
            params=params,
            progress=0.0,
            message="starting" if claim else "queued",
            heartbeat_at=now if claim else None,
            created_at=now,
            updated_at=now,
            inputs=[MergeJobInput(expert_id=eid, weight=w) for eid, w in weights.items()],
        )
        self.session.add(job)
        try:
            await self.session.commit()
        except IntegrityError as exc:  # a job submitted at the same moment took the name after our check
            await self.session.rollback()
            raise Conflict(
                f"name: another merge job will register {name!r}", param="name", code="duplicate_slug"
            ) from exc
        return job

    async def resolve(self, checked: CheckedRequest, pinned: dict[str, Any] | None = None) -> ResolvedMerge:
        """Find every named expert (by the ids in ``pinned`` when given) and plan the merge from their
        folders; errors name the request field."""
        request = checked.request
        pinned = pinned or {}
        base: Expert | None = None
        base_ref: ModelRef | None = None
        if request.base_model is not None:
            base = await self._expert(request.base_model, "base_model", pinned.get("base_model"))
            base_ref = self._ref(request.base_model, base)
        entries = checked.models
        ids = pinned.get("models") or [None] * len(entries)
        inputs = [await self._expert(entry.model, checked.model_param(i), ids[i]) for i, entry in enumerate(entries)]
        refs = [self._ref(entry.model, e) for entry, e in zip(entries, inputs, strict=True)]
        plan = plan_merge(checked, base_ref, refs)
        return ResolvedMerge(plan, base, inputs)

    def _ref(self, ref: str, expert: Expert) -> ModelRef:
        return ModelRef(ref, self.store.expert_dir(expert.id), expert_id=expert.id, base_id=expert.base_id)

    async def _expert(self, ref: str, param: str, pinned: str | None) -> Expert:
        if pinned is not None:
            expert = await self.session.get(Expert, uuid.UUID(pinned))
            if expert is None:
                raise ValidationFailed(
                    f"{param}: {ref!r} was deleted after the job was submitted", param=param, code="expert_not_found"
                )
            return expert
        found = await ExpertService(self.session, self.store).find(ref)
        if found is None:
            raise ValidationFailed(f"{param}: no registered expert named {ref!r}", param=param, code="expert_not_found")
        return found

    async def _check_name_free(self, name: str) -> None:
        if await ExpertService(self.session, self.store).find(name) is not None:
            raise Conflict(f"name: an expert named {name!r} already exists", param="name", code="duplicate_slug")
        pending = await self.session.scalar(
            select(MergeJob).where(
                MergeJob.result_name == name,
                MergeJob.status.in_([MergeJobStatus.queued.value, MergeJobStatus.running.value]),
            )
        )
        if pending is not None:
            raise Conflict(
                f"name: merge job {pending.id} ({pending.status}) will register {name!r}",
                param="name",
                code="duplicate_slug",
            )

    async def get(self, job_id: str | uuid.UUID) -> MergeJob:
        try:
            key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
        except ValueError:
            key = None
        job = await self.session.get(MergeJob, key, populate_existing=True) if key is not None else None
        if job is None:
            raise NotFound(f"no merge job {job_id!s}", param="id", code="merge_job_not_found")
        return job

    async def list_jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> JobPage:
        if not 1 <= limit <= 500:
            raise ValidationFailed("limit must be between 1 and 500", param="limit")
        if offset < 0:
            raise ValidationFailed("offset must be 0 or more", param="offset")
        if status is not None and status not in STATUSES:
            raise ValidationFailed(f"status: {status!r} is not one of {', '.join(STATUSES)}", param="status")
        where = [MergeJob.status == status] if status else []
        total = int(await self.session.scalar(select(func.count()).select_from(MergeJob).where(*where)) or 0)
        query = (
            select(MergeJob)
            .where(*where)
            .order_by(MergeJob.created_at.desc(), MergeJob.id)
            .limit(limit)
            .offset(offset)
            .execution_options(populate_existing=True)
        )
        return JobPage(list(await self.session.scalars(query)), total, limit, offset)

    async def cancel(self, job_id: str | uuid.UUID) -> MergeJob:
        """A queued job is cancelled at once; a running one is asked to stop (between two tensors)."""
        job = await self.get(job_id)
        for _ in range(3):  # the job may start running between our read and our write
            if job.status in TERMINAL:
                raise Conflict(
                    f"merge job {job.id} is already {job.status}", param="id", code=f"merge_job_{job.status}"
                )
            if job.status == MergeJobStatus.queued.value:
                values: dict[str, Any] = {"status": MergeJobStatus.cancelled.value, "message": "cancelled"}
            else:
                values = {"cancel_requested": True, "message": "cancelling"}
            done = await self.session.execute(
                update(MergeJob)
                .where(MergeJob.id == job.id, MergeJob.status == job.status)
                .values(**values, updated_at=utcnow())
            )
            await self.session.commit()
            job = await self.get(job.id)
            if done.rowcount == 1:  # type: ignore[attr-defined]
                return job
        return job

    async def describe(self, job: MergeJob) -> dict[str, Any]:
        return (await self.describe_many([job]))[0]

    async def with_result_slug(self, job: MergeJob) -> tuple[MergeJob, str | None]:
        if job.result_expert_id is None:
            return job, None
        return job, await self.session.scalar(select(Expert.slug).where(Expert.id == job.result_expert_id))

    async def describe_many(self, jobs: Sequence[MergeJob]) -> list[dict[str, Any]]:
        ids = {j.result_expert_id for j in jobs if j.result_expert_id is not None}
        slugs: dict[uuid.UUID, str] = {}
        if ids:
            slugs = dict((await self.session.execute(select(Expert.id, Expert.slug).where(Expert.id.in_(ids)))).all())
        return [job_summary(j, slugs.get(j.result_expert_id) if j.result_expert_id else None) for j in jobs]


def job_name(job: MergeJob) -> str:
    return str((job.params.get("config") or {}).get("name") or "")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()  # SQLite drops the zone


def job_progress(job: MergeJob, result_slug: str | None = None) -> dict[str, Any]:
    """The moving part of a job: what the progress stream sends."""
    return {
        "id": str(job.id),
        "status": job.status,
        "progress": round(float(job.progress or 0.0), 4),
        "message": job.message,
        "error": job.error,
        "cancel_requested": bool(job.cancel_requested),
        "result_expert": (
            {"id": str(job.result_expert_id), "slug": result_slug} if job.result_expert_id is not None else None
        ),
        "updated_at": _iso(job.updated_at),
        "heartbeat_at": _iso(job.heartbeat_at),
    }


def job_summary(job: MergeJob, result_slug: str | None = None) -> dict[str, Any]:
    """The JSON shape of a merge job for the API and `moerge merges show`."""
    return {
        "object": "merge_job",
        **job_progress(job, result_slug),
        "name": job_name(job),
        "method": job.method,
        "created_at": _iso(job.created_at),
        "config": job.params.get("config"),
        "plan": job.params.get("plan"),
        "inputs": [{"expert_id": str(i.expert_id), "weight": i.weight} for i in job.inputs],
    }


# -- runners ----------------------------------------------------------------------------------------------


class MergeRunner(Protocol):
    """What runs queued jobs: in process by default; a durable queue or a Ray job past one machine."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""


@dataclass
class _Run:
    """The state shared by one job's executor thread and the event loop."""

    job_id: uuid.UUID
    done: int = 0
    total: int = 0
    tensor: str = ""
    phase: str = "starting"
    cancel_event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # why cancel_event was set: requested | shutdown | interrupted | lost

    def on_progress(self, done: int, total: int, name: str) -> None:  # the executor's thread
        self.done, self.total, self.tensor = done, total, name

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancel_event.set()

    def snapshot(self) -> tuple[float, str]:
        if self.phase == "merging" and self.total:
            return MERGE_SHARE * self.done / self.total, f"merging: {self.done}/{self.total} tensors ({self.tensor})"
        if self.phase == "registering":
            return MERGE_SHARE, "registering the merged model"
        return 0.0, self.phase


class InProcessRunner:
    """Runs queued jobs one at a time in this process: the executor in a thread, bookkeeping in the loop."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: ArtifactStore,
        merges_dir: Path,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        poll_s: float = 2.0,
        options: ExecutorOptions | None = None,
        max_lora_rank: int = MAX_LORA_RANK,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.max_lora_rank = max_lora_rank  # a merged LoRA registers under the same rank rule as an upload
        self.store = store
        self.merges_dir = merges_dir
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.options = options
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._current: _Run | None = None

    @classmethod
    def for_settings(
        cls, sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore, settings: Settings
    ) -> InProcessRunner:
        """The runner `moerge serve` and `moerge merge` use: output folder, stale limit and rank rule from settings."""
        return cls(
            sessionmaker,
            store,
            settings.merges_dir,
            stale_after_s=settings.merge_stale_after_s,
            max_lora_rank=settings.max_lora_rank,
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.recover(sweep=True)
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="moerge-merge-runner")

    async def stop(self) -> None:
        """Stop taking jobs; a merge in progress stops at its next tensor and goes back to the queue."""
        self._stopping = True
        if self._current is not None:
            self._current.cancel("shutdown")
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.recover()
                ran = await self.run_next()
            except Exception:  # a database hiccup must not end the worker
                log.exception("merge runner: error between jobs")
                ran = None
            if ran is None and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)

    # -- claiming and running -------------------------------------------------------------------------
    async def run_next(self) -> MergeJob | None:
        """Claim the oldest queued job and run it; None when there was none."""
        job_id = await self._claim_next()
        return await self.run_job(job_id) if job_id is not None else None

    async def _claim_next(self) -> uuid.UUID | None:
        async with self.sessionmaker() as session:
            queued = await session.scalars(
                select(MergeJob.id)
                .where(MergeJob.status == MergeJobStatus.queued.value)
                .order_by(MergeJob.created_at, MergeJob.id)
                .limit(5)
            )
            for job_id in list(queued):
                now = utcnow()
                claimed = await session.execute(
                    update(MergeJob)
                    .where(MergeJob.id == job_id, MergeJob.status == MergeJobStatus.queued.value)
                    .values(status=MergeJobStatus.running.value, heartbeat_at=now, updated_at=now, message="starting")
                )
                await session.commit()
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return job_id
        return None

    async def run_job(self, job_id: uuid.UUID, *, on_tick: TickFn | None = None) -> MergeJob:
        """Run a job this runner has claimed (status ``running``) to its end; returns the final row."""
        run = _Run(job_id)
        self._current = run
        beat = asyncio.create_task(self._heartbeat(run, on_tick))
        try:
            await self._run(run)
        finally:
            self._current = None
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            self._remove_output(job_id)
        async with self.sessionmaker() as session:
            job = await session.get(MergeJob, job_id)
            assert job is not None
            if on_tick is not None:
                on_tick(job.progress, job.message)
            return job

    async def _run(self, run: _Run) -> None:
        try:
            resolved, name = await self._load(run.job_id)
            run.phase = "merging"
            folder = await self._execute(run, resolved.plan)
            run.phase = "registering"
            await self._register(run, resolved, name, folder)
        except MergeCancelled:
            if run.reason == "shutdown":
                await self._finish(run, MergeJobStatus.queued, "re-queued: the server stopped during the merge")
            else:
                await self._finish(run, MergeJobStatus.cancelled, "cancelled")
        except asyncio.CancelledError:  # the caller went away (Ctrl-C in `moerge merge`)
            await self._finish(run, MergeJobStatus.cancelled, "cancelled: the process running it was interrupted")
            raise
        except Exception as exc:
            if not isinstance(exc, MoergeError):
                log.exception("merge job %s failed", run.job_id)
            await self._finish(run, MergeJobStatus.failed, "failed", error=_error_text(exc))

    async def _load(self, job_id: uuid.UUID) -> tuple[ResolvedMerge, str]:
        """The plan, rebuilt from the row (the experts pinned by id) with the same checks as at submit."""
        async with self.sessionmaker() as session:
            job = await session.get(MergeJob, job_id)
            if job is None:
                raise NotFound(f"no merge job {job_id}", param="id")
            checked = check_request(parse_request(job.params["config"]))
            resolved = await MergeJobService(session, self.store).resolve(checked, job.params.get("resolved"))
            return resolved, job_name(job)

    async def _execute(self, run: _Run, plan: MergePlan) -> Path:
        dest = self.merges_dir / str(run.job_id)
        shutil.rmtree(dest, ignore_errors=True)  # a re-queued job's earlier output
        work = asyncio.ensure_future(
            asyncio.to_thread(
                execute,
                plan,
                dest,
                options=self.options,
                on_progress=run.on_progress,
                should_cancel=run.cancel_event.is_set,
            )
        )
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            run.cancel("interrupted")
            with contextlib.suppress(Exception):
                await work  # the thread stops at its next tensor and removes its partial output
            raise
        return outcome.folder

    async def _register(self, run: _Run, resolved: ResolvedMerge, name: str, folder: Path) -> None:
        plan = resolved.plan
        base_id = resolved.lineage_base()
        request: MergeRequest = plan.checked.request
        spec = ExpertSpec(
            slug=name,
            kind=ExpertKind.merged.value,
            base=str(base_id) if base_id is not None else None,
            description=request.description or _describe(plan),
            tags=["merged", plan.method_name],
            source_uri=f"merge-job:{run.job_id}",
        )

        async with self.sessionmaker() as session:

            async def mark_succeeded(expert: Expert) -> None:  # in the registration's own transaction
                done = await session.execute(
                    update(MergeJob)
                    .where(MergeJob.id == run.job_id, MergeJob.status == MergeJobStatus.running.value)
                    .values(
                        status=MergeJobStatus.succeeded.value,
                        progress=1.0,
                        message=f"registered {expert.slug}",
                        result_expert_id=expert.id,
                        heartbeat_at=utcnow(),
                        updated_at=utcnow(),
                    )
                )
                if done.rowcount != 1:  # type: ignore[attr-defined]
                    raise Conflict("the job stopped running before its result was registered", param="id")

            await ExpertService(session, self.store, max_lora_rank=self.max_lora_rank).register_folder(
                folder,
                spec,
                source_uri=spec.source_uri,
                parents=resolved.parents(),
                merge_job_id=run.job_id,
                before_commit=mark_succeeded,
            )

    async def _finish(self, run: _Run, status: MergeJobStatus, message: str, *, error: str | None = None) -> None:
        values: dict[str, Any] = {"status": status.value, "message": message, "error": error, "updated_at": utcnow()}
        if status == MergeJobStatus.queued:
            values.update(progress=0.0, cancel_requested=False, heartbeat_at=None)
        async with self.sessionmaker() as session:
            await session.execute(
                update(MergeJob)
                .where(MergeJob.id == run.job_id, MergeJob.status == MergeJobStatus.running.value)
                .values(**values)
            )
            await session.commit()

    async def _heartbeat(self, run: _Run, on_tick: TickFn | None) -> None:
        """Progress and liveness into the row, the cancel flag out of it, every ``heartbeat_s``."""
        while True:
            progress, message = run.snapshot()
            try:
                async with self.sessionmaker() as session:
                    row = (
                        await session.execute(
                            update(MergeJob)
                            .where(MergeJob.id == run.job_id, MergeJob.status == MergeJobStatus.running.value)
                            .values(progress=progress, message=message, heartbeat_at=utcnow(), updated_at=utcnow())
                            .returning(MergeJob.cancel_requested)
                        )
                    ).first()
                    await session.commit()
                if row is None:  # no longer ours: recovered as dead by another worker, or gone
                    run.cancel("lost")
                elif row[0]:
                    run.cancel("requested")
            except Exception:
                log.exception("merge job %s: heartbeat failed", run.job_id)
            if on_tick is not None:
                on_tick(progress, message)
            await asyncio.sleep(self.heartbeat_s)

    # -- recovery -------------------------------------------------------------------------------------
    async def recover(self, *, sweep: bool = False) -> list[uuid.UUID]:
        """Settle ``running`` jobs whose worker died (stale heartbeat): ``succeeded`` if their expert was
        registered, else ``failed``; then remove outputs no running job owns. Returns the settled jobs."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.stale_after_s)
        stale_where = (
            MergeJob.status == MergeJobStatus.running.value,
            or_(MergeJob.heartbeat_at.is_(None), MergeJob.heartbeat_at < cutoff),
        )
        settled: list[uuid.UUID] = []
        async with self.sessionmaker() as session:
            stale = list((await session.execute(select(MergeJob.id, MergeJob.heartbeat_at).where(*stale_where))).all())
            for job_id, beat in stale:
                if self._current is not None and self._current.job_id == job_id:
                    continue
                expert_id = await session.scalar(select(Expert.id).where(Expert.merge_job_id == job_id).limit(1))
                if expert_id is not None:
                    values: dict[str, Any] = {
                        "status": MergeJobStatus.succeeded.value,
                        "progress": 1.0,
                        "result_expert_id": expert_id,
                        "message": "recovered: its result was registered before the worker stopped",
                    }
                else:
                    since = _iso(beat) or "its start"
                    values = {
                        "status": MergeJobStatus.failed.value,
                        "message": "failed: the worker died",
                        "error": f"the worker running this job died (no heartbeat since {since}); nothing was "
                        "registered and its partial output was removed: submit the job again",
                    }
                done = await session.execute(
                    update(MergeJob).where(MergeJob.id == job_id, *stale_where).values(**values, updated_at=now)
                )
                await session.commit()
                if done.rowcount == 1:  # type: ignore[attr-defined]
                    log.warning("merge job %s: %s", job_id, values["message"])
                    settled.append(job_id)
        if sweep or settled:
            await self._sweep()
        return settled

    async def _sweep(self) -> None:
        """Remove outputs (``<id>``, ``.<id>.partial-*``) of jobs that are not running."""
        if not self.merges_dir.is_dir():
            return
        entries = list(self.merges_dir.iterdir())  # listed before reading who runs, so a new job's is kept
        async with self.sessionmaker() as session:
            running = {
                str(i)
                for i in await session.scalars(
                    select(MergeJob.id).where(MergeJob.status == MergeJobStatus.running.value)
                )
            }
        for entry in entries:
            found = _OUTPUT_RE.match(entry.name)
            if found is not None and found.group(1) not in running:
                _remove(entry)

    def _remove_output(self, job_id: uuid.UUID) -> None:
        if self.merges_dir.is_dir():
            for entry in self.merges_dir.glob(f"*{job_id}*"):
                if (m := _OUTPUT_RE.match(entry.name)) is not None and m.group(1) == str(job_id):
                    _remove(entry)


_OUTPUT_RE = re.compile(r"^\.?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:\.partial-\w+)?$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, MoergeError):
        return (
            exc.message if not exc.param or exc.message.startswith(f"{exc.param}:") else f"{exc.param}: {exc.message}"
        )
    return f"{type(exc).__name__}: {exc}"


def _describe(plan: MergePlan) -> str:
    names = ", ".join(m.label for m in plan.inputs)
    on = f" on {plan.base.label}" if plan.base is not None else ""
    return f"{plan.method_name} merge of {names}{on} ({plan.output_format} output)"
