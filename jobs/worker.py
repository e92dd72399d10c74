"""The worker: claims queued jobs, runs each with its kind's handler, keeps its lease, and settles the jobs
of workers that died.

Claiming: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (any number of workers on any number of
machines take different rows without waiting on each other), then a conditional UPDATE ``queued ->
running`` that records the owner: on SQLite (one machine; no row locks) that UPDATE alone decides who won.

The lease: while a job runs, its worker writes progress and ``heartbeat_at`` about twice a second, only
while the row is still ``running`` and still names it as owner, and reads the cancel flag back. A job whose
heartbeat is older than ``stale_after_s`` has lost its worker: any worker's ``recover`` settles it:
``succeeded`` if its result was registered (registration and the success mark share one transaction, so a
result is registered at most once), else queued again while its kind allows another attempt, else
``failed``; its partial output is removed. A worker stopped cleanly (SIGTERM) re-queues its job: nothing was
wrong with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import DatabaseUnavailable, MoergeError, NotFound
from core.metrics import JOB_SECONDS, JOBS
from core.periodic import Periodic
from jobs.run import JobCancelled, JobHandler, JobRun
from registry.jobs import iso
from registry.models import Job, JobStatus, utcnow

log = logging.getLogger("moerge.jobs")

HEARTBEAT_S = 0.5
TickFn = Callable[[float, str], None]  # (progress 0..1, message), about every heartbeat

_OUTPUT_RE = re.compile(r"^\.?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:\.partial-\w+)?$")


def worker_name() -> str:
    """Who holds a lease: host, process and a random part (two workers in one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs queued jobs of the kinds it has handlers for, one at a time, in this process."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        handlers: Sequence[tuple[JobHandler, Path]],
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = 30.0,
        poll_s: float = 2.0,
        name: str | None = None,
    ) -> None:
        """``handlers``: each kind's handler with the folder its jobs work in (``<folder>/<job id>``)."""
        self.sessionmaker = sessionmaker
        self.handlers = {handler.kind: handler for handler, _ in handlers}
        self.work_roots = {handler.kind: root for handler, root in handlers}
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.name = name or worker_name()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._current: JobRun | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.recover(sweep=True)
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="moerge-worker")

    async def stop(self) -> None:
        """Stop taking jobs; a job in progress stops at its next chance and goes back to the queue."""
        self._stopping = True
        if self._current is not None:
            self._current.stop("shutdown")
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    @property
    def busy(self) -> bool:
        return self._current is not None

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.recover()
                ran = await self.run_next()
            except DatabaseUnavailable as exc:  # down or restarting: said once per poll, without a traceback
                log.warning("worker: %s", exc.message)
                ran = None
            except Exception:  # a database hiccup must not end the worker
                log.exception("worker: error between jobs")
                ran = None
            if ran is None and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)

    # -- claiming and running -------------------------------------------------------------------------
    async def run_next(self) -> Job | None:
        """Claim the oldest queued job of a kind this worker runs and run it; None when there was none."""
        job_id = await self.claim_next()
        return await self.run_job(job_id) if job_id is not None else None

    async def claim_next(self) -> uuid.UUID | None:
        async with self.sessionmaker() as session:
            for _ in range(5):  # SQLite: another worker may win a row between our read and our write
                job_id = await session.scalar(
                    select(Job.id)
                    .where(Job.status == JobStatus.queued.value, Job.kind.in_(list(self.handlers)))
                    .order_by(Job.created_at, Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has no row locks (the UPDATE decides)
                )
                if job_id is None:
                    await session.commit()
                    return None
                now = utcnow()
                claimed = await session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.queued.value)
                    .values(
                        status=JobStatus.running.value,
                        owner=self.name,
                        attempts=Job.attempts + 1,
                        heartbeat_at=now,
                        updated_at=now,
                        message="starting",
                    )
                )
                await session.commit()
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return job_id
        return None

    async def run_job(self, job_id: uuid.UUID, *, on_tick: TickFn | None = None) -> Job:
        """Run a job this worker holds (status ``running``, owner this worker) to its end; the final row."""
        async with self.sessionmaker() as session:
            job = await session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}", param="id", code="job_not_found")
            handler = self.handlers[job.kind]
            root = self.work_roots[job.kind]
            run = JobRun(job.id, job.kind, job.method, dict(job.params), job.result_name, self.name, root / str(job.id))
        self._current = run
        # stopped between two beats, never cancelled inside one's database write (core/periodic.py)
        beat = Periodic(
            lambda: self._beat(run, on_tick), self.heartbeat_s, name=f"heartbeat-{job_id}", now=True
        ).start()
        started = time.perf_counter()
        try:
            await self._run(handler, run)
        finally:
            self._current = None
            _remove_outputs(root, job_id)  # first: a client told the job ended finds its work folder gone
            await beat.stop()
        async with self.sessionmaker() as session:
            done = await session.get(Job, job_id)
            assert done is not None
            if run.reason != "lost":  # a lost job was settled, and counted, by the worker that took it over
                # the row's status: succeeded, failed, cancelled, or queued again (stopped by a shutdown)
                JOBS.labels(kind=run.kind, status=done.status).inc()
                JOB_SECONDS.labels(kind=run.kind, status=done.status).observe(time.perf_counter() - started)
            if on_tick is not None:
                on_tick(done.progress, done.message)
            return done

    async def _run(self, handler: JobHandler, run: JobRun) -> None:
        shutil.rmtree(run.work_dir, ignore_errors=True)  # a re-queued job's earlier output
        try:
            await handler.run(run)
            if not run.succeeded:
                raise RuntimeError(f"the {run.kind} handler ended without recording a result")
        except JobCancelled:
            if run.reason == "shutdown":
                await self._finish(run, JobStatus.queued, f"re-queued: the server stopped during the {handler.noun}")
            elif run.reason != "lost":  # a lost job is no longer ours to write
                await self._finish(run, JobStatus.cancelled, "cancelled")
        except asyncio.CancelledError:  # the caller went away (Ctrl-C in `moerge merge`)
            await self._finish(run, JobStatus.cancelled, "cancelled: the process running it was interrupted")
            raise
        except Exception as exc:
            if not isinstance(exc, MoergeError):
                log.exception("%s job %s failed", run.kind, run.job_id)
            await self._finish(run, JobStatus.failed, "failed", error=error_text(exc))

    async def _finish(self, run: JobRun, status: JobStatus, message: str, *, error: str | None = None) -> None:
        values: dict[str, Any] = {"status": status.value, "message": message, "error": error, "updated_at": utcnow()}
        if status == JobStatus.queued:
            values.update(progress=0.0, cancel_requested=False, heartbeat_at=None, owner=None)
        async with self.sessionmaker() as session:
            await session.execute(
                update(Job)
                .where(Job.id == run.job_id, Job.status == JobStatus.running.value, Job.owner == self.name)
                .values(**values)
            )
            await session.commit()

    async def _beat(self, run: JobRun, on_tick: TickFn | None) -> None:
        """Progress and the lease into the row, the cancel flag out of it (every ``heartbeat_s``)."""
        progress, message = run.progress, run.message
        try:
            async with self.sessionmaker() as session:
                row = (
                    await session.execute(
                        update(Job)
                        .where(Job.id == run.job_id, Job.status == JobStatus.running.value, Job.owner == self.name)
                        .values(progress=progress, message=message, heartbeat_at=utcnow(), updated_at=utcnow())
                        .returning(Job.cancel_requested)
                    )
                ).first()
                await session.commit()
            if row is None and not run.succeeded:  # no longer ours: settled by another worker, or gone
                run.stop("lost")
            elif row is not None and row[0]:
                run.stop("requested")
        except Exception:
            log.exception("%s job %s: heartbeat failed", run.kind, run.job_id)
        if on_tick is not None:
            on_tick(progress, message)

    # -- recovery -------------------------------------------------------------------------------------
    async def recover(self, *, sweep: bool = False) -> list[uuid.UUID]:
        """Settle ``running`` jobs whose lease expired (stale heartbeat): ``succeeded`` if their result was
        registered, queued again if their kind allows another attempt, else ``failed``; then remove outputs
        no running job owns. Returns the settled jobs."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.stale_after_s)
        stale_where = (
            Job.status == JobStatus.running.value,
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
        )
        settled: list[uuid.UUID] = []
        async with self.sessionmaker() as session:
            stale = list(await session.scalars(select(Job).where(*stale_where, Job.kind.in_(list(self.handlers)))))
            for job in stale:
                if self._current is not None and self._current.job_id == job.id:
                    continue
                values = await self._settlement(session, job)
                done = await session.execute(
                    update(Job)
                    .where(Job.id == job.id, *stale_where)
                    .values(**values, updated_at=now)
                    .execution_options(synchronize_session=False)  # no Python-side compare of SQLite's naive times
                )
                await session.commit()
                if done.rowcount == 1:  # type: ignore[attr-defined]
                    log.warning("%s job %s: %s", job.kind, job.id, values["message"])
                    JOBS.labels(kind=job.kind, status=values["status"]).inc()  # its worker died: no duration
                    settled.append(job.id)
        if sweep or settled:
            await self._sweep()
        return settled

    async def _settlement(self, session: AsyncSession, job: Job) -> dict[str, Any]:
        handler = self.handlers[job.kind]
        expert_id = await handler.registered_result(session, job)
        if expert_id is not None:
            return {
                "status": JobStatus.succeeded.value,
                "progress": 1.0,
                "result_expert_id": expert_id,
                "message": "recovered: its result was registered before the worker stopped",
            }
        if int(job.attempts or 0) < handler.max_attempts:
            return {
                "status": JobStatus.queued.value,
                "progress": 0.0,
                "owner": None,
                "heartbeat_at": None,
                "message": f"re-queued: its worker ({job.owner}) died",
            }
        since = iso(job.heartbeat_at) or "its start"
        return {
            "status": JobStatus.failed.value,
            "message": "failed: the worker died",
            "error": f"the worker running this job died (no heartbeat since {since}); nothing was "
            "registered and its partial output was removed: submit the job again",
        }

    async def _sweep(self) -> None:
        """Remove outputs (``<id>``, ``.<id>.partial-*``) of jobs that are not running."""
        roots = {root for root in self.work_roots.values() if root.is_dir()}
        if not roots:
            return
        entries = [entry for root in roots for entry in root.iterdir()]  # listed first: a new job's is kept
        async with self.sessionmaker() as session:
            running = {
                str(i) for i in await session.scalars(select(Job.id).where(Job.status == JobStatus.running.value))
            }
        for entry in entries:
            found = _OUTPUT_RE.match(entry.name)
            if found is not None and found.group(1) not in running:
                _remove(entry)


def _remove_outputs(root: Path, job_id: uuid.UUID) -> None:
    if root.is_dir():
        for entry in root.glob(f"*{job_id}*"):
            if (m := _OUTPUT_RE.match(entry.name)) is not None and m.group(1) == str(job_id):
                _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, MoergeError):
        return (
            exc.message if not exc.param or exc.message.startswith(f"{exc.param}:") else f"{exc.param}: {exc.message}"
        )
    return f"{type(exc).__name__}: {exc}"
