"""What a job's handler gets and gives: the ``JobRun`` it reports progress on and stops by, and the
``JobHandler`` base every kind implements."""

from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, MoergeError
from registry.models import Job, JobStatus, utcnow


class JobCancelled(MoergeError):
    """The job was asked to stop (cancelled, its worker stopping, or its lease lost); its handler raises this
    at the next point where it can stop."""

    default_code = "job_cancelled"


@dataclass
class JobRun:
    """One claimed job as its handler sees it. ``report`` and ``stop_requested`` may be called from any
    thread (a handler's work runs in one); the worker writes the progress into the row with each heartbeat
    and sets the stop flag when the row asks for it."""

    job_id: uuid.UUID
    kind: str
    method: str
    params: dict[str, Any]
    result_name: str | None
    owner: str
    work_dir: Path  # the job's own folder; removed when the job ends, whatever the outcome
    progress: float = 0.0
    message: str = "starting"
    stop_event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # why stop_event was set: requested | shutdown | interrupted | lost
    succeeded: bool = False

    def report(self, progress: float, message: str) -> None:
        self.progress, self.message = max(0.0, min(1.0, progress)), message

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop_event.set()

    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise JobCancelled(f"stopped ({self.reason})")

    async def succeed(
        self,
        session: AsyncSession,
        message: str,
        *,
        expert_id: uuid.UUID | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Mark the job succeeded in ``session``'s transaction (the one registering its result, so the result
        is registered at most once and never without a finished job). ``Conflict`` if this worker no longer
        holds the job (its lease was taken over): the caller's transaction then rolls back."""
        done = await session.execute(
            update(Job)
            .where(Job.id == self.job_id, Job.status == JobStatus.running.value, Job.owner == self.owner)
            .values(
                status=JobStatus.succeeded.value,
                progress=1.0,
                message=message,
                result_expert_id=expert_id,
                result=result,
                heartbeat_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict("the job stopped running here before its result was registered", param="id")
        self.succeeded = True

    async def check_lease(self, session: AsyncSession) -> None:
        """``Conflict`` unless this worker still holds the job (for a result registered before the job is
        marked succeeded, in the registering transaction)."""
        held = await session.scalar(
            select(Job.id).where(Job.id == self.job_id, Job.status == JobStatus.running.value, Job.owner == self.owner)
        )
        if held is None:
            raise Conflict("the job stopped running here before its result was registered", param="id")


class JobHandler(ABC):
    """Runs the jobs of one kind."""

    kind: ClassVar[str]
    noun: ClassVar[str]  # what its jobs do, in messages: "merge", "training", "fitting"
    # Lost workers: a job whose worker died is queued again until it has been claimed this many times, then
    # failed (a job that killed its worker, out of memory say, would kill the next one too).
    max_attempts: ClassVar[int] = 1

    @abstractmethod
    async def run(self, job: JobRun) -> None:
        """Do the job; on success call ``job.succeed`` in the transaction that records its result. Raise
        ``JobCancelled`` when ``job.stop_requested()``."""

    async def registered_result(self, session: AsyncSession, job: Job) -> uuid.UUID | None:
        """The expert a job of this kind registered, if any: how a job whose worker died after registering
        is settled as succeeded."""
        return None
