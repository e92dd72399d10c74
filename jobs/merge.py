"""Merge jobs: the plan rebuilt from the row (the experts pinned by id, with the same checks as at submit),
the streaming executor run in a thread into the job's folder, and the merged folder registered as a
``merged`` expert in the transaction that marks the job succeeded."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import InsufficientStorage, is_out_of_space
from jobs.run import JobCancelled, JobHandler, JobRun
from merging.config import MergeRequest, check_request, parse_request
from merging.executor import ExecutorOptions, MergeCancelled, execute
from merging.jobs import MergeJobService, ResolvedMerge
from merging.plan import MergePlan
from registry.limits import MAX_LORA_RANK
from registry.models import Expert, ExpertKind, Job, JobKind
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from registry.store import ArtifactStore

MERGE_SHARE = 0.95  # of the progress bar; registering the result (hashing, storing) takes the rest


class MergeHandler(JobHandler):
    kind = JobKind.merge.value
    noun = "merge"

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: ArtifactStore,
        *,
        options: ExecutorOptions | None = None,
        max_lora_rank: int = MAX_LORA_RANK,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.store = store
        self.options = options
        self.max_lora_rank = max_lora_rank  # a merged LoRA registers under the same rank rule as an upload

    async def run(self, job: JobRun) -> None:
        async with self.sessionmaker() as session:
            checked = check_request(parse_request(job.params["config"]))
            resolved = await MergeJobService(session, self.store).resolve(checked, job.params.get("resolved"))
        job.report(0.0, "merging")
        folder = await self._execute(job, resolved.plan)
        job.report(MERGE_SHARE, "registering the merged model")
        try:
            await self._register(job, resolved, folder)
        except BaseException:
            # The output goes at once, before the worker records the failure: on a full disk that record (a
            # database write on the same disk, maybe) needs the space the output holds.
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def _execute(self, job: JobRun, plan: MergePlan) -> Path:
        def on_progress(done: int, total: int, name: str) -> None:  # the executor's thread
            job.report(MERGE_SHARE * done / max(total, 1), f"merging: {done}/{total} tensors ({name})")

        work = asyncio.ensure_future(
            asyncio.to_thread(
                execute,
                plan,
                job.work_dir,
                options=self.options,
                on_progress=on_progress,
                should_cancel=job.stop_requested,
            )
        )
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            job.stop("interrupted")
            with contextlib.suppress(Exception):
                await work  # the thread stops at its next tensor and removes its partial output
            raise
        except MergeCancelled as exc:
            raise JobCancelled(str(exc)) from exc
        except OSError as exc:  # the executor removed its partial output already
            if not is_out_of_space(exc):
                raise
            raise InsufficientStorage(
                f"the disk holding the merge's output ($MOERGE_HOME/merges) is full: writing the merged model "
                f"failed ({exc.strerror}); its partial output was removed: free space and submit the merge again"
            ) from exc
        return outcome.folder

    async def _register(self, job: JobRun, resolved: ResolvedMerge, folder: Path) -> None:
        plan = resolved.plan
        base_id = resolved.lineage_base()
        request: MergeRequest = plan.checked.request
        name = job.result_name or str(request.name)
        spec = ExpertSpec(
            slug=name,
            kind=ExpertKind.merged.value,
            base=str(base_id) if base_id is not None else None,
            description=request.description or _describe(plan),
            tags=["merged", plan.method_name],
            source_uri=f"merge-job:{job.job_id}",
        )
        async with self.sessionmaker() as session:

            async def mark_succeeded(expert: Expert) -> None:  # in the registration's own transaction
                await job.succeed(session, f"registered {expert.slug}", expert_id=expert.id)

            await ExpertService(session, self.store, max_lora_rank=self.max_lora_rank).register_folder(
                folder,
                spec,
                source_uri=spec.source_uri,
                parents=resolved.parents(),
                merge_job_id=job.job_id,
                before_commit=mark_succeeded,
            )

    async def registered_result(self, session: AsyncSession, job: Job) -> uuid.UUID | None:
        found: uuid.UUID | None = await session.scalar(select(Expert.id).where(Expert.merge_job_id == job.id).limit(1))
        return found


def _describe(plan: MergePlan) -> str:
    names = ", ".join(m.label for m in plan.inputs)
    on = f" on {plan.base.label}" if plan.base is not None else ""
    return f"{plan.method_name} merge of {names}{on} ({plan.output_format} output)"
