"""Fit jobs: a composition's router states (Arrow prototypes, PHATGOOSE gates, a mixer, `instruct`'s
descriptions) fitted and stored as router artifacts, off the request that created or changed the
composition. A query that arrives first fits what it needs itself (in the same process the two share one
fit: ``routers/token/states.py``); the stored states are keyed by content, so a second fit finds them."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from composition.mixtures import fit_router
from composition.service import CompositionService
from jobs.run import JobHandler, JobRun
from registry.models import JobKind
from registry.store import ArtifactStore
from routers.query import RouterContext


class FitHandler(JobHandler):
    kind = JobKind.fit.value
    noun = "fitting"
    max_attempts = 2  # fitting is deterministic and idempotent: a lost worker's job is tried once more

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore, context: Callable[[], RouterContext]
    ) -> None:
        self.sessionmaker = sessionmaker
        self.store = store
        self.context = context  # the routers' context (embedder; a generate function for model-run fits)

    async def run(self, job: JobRun) -> None:
        name = str(job.params["composition"])
        async with self.sessionmaker() as session:
            service = CompositionService(session, self.store)
            comp = await service.get(name)
            experts = await service.member_experts(comp)
            router, params = comp.router, dict(comp.router_params)
            job.report(0.05, f"fitting {router} for {name} over {len(experts)} experts")

            def fitted(done: int, total: int) -> None:
                job.report(0.05 + 0.9 * done / total, f"fitting {router} for {name}: {done} of {total} experts fitted")

            def stepped(step: int, steps: int, loss: float) -> None:  # a mixer trains for the whole set
                job.report(
                    0.05 + 0.9 * step / steps,
                    f"training the {router} router for {name}: step {step}/{steps}, loss {loss:.3f}",
                )

            await fit_router(
                session,
                self.store,
                self.context(),
                router,
                params,
                experts,
                run_models=True,
                on_fitted=fitted,
                on_step=stepped,
            )
        job.check_stop()
        async with self.sessionmaker() as session:
            result = {"composition": name, "router": router, "experts": len(experts)}
            await job.succeed(session, f"fitted {router} for {name}", result=result)
            await session.commit()
