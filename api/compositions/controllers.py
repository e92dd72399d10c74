"""/api/compositions: create, list, get, update, delete composed systems."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_composer, provide_router_context, wake_worker
from api.openai.serving import routing_headers
from api.schemas import (
    CompositionList,
    CompositionOut,
    JobOut,
    RouteOut,
    TokenTraceOut,
    WeightedExpert,
    composition_out,
    job_out,
)
from api.security import check_model, require_admin, require_query
from composition.composer import Composer, check_traceable
from composition.mixtures import RouterFitter, queue_fit, router_fitter
from composition.plan import Plan, Query
from composition.service import CompositionPatch, CompositionService, CompositionSpec
from core.errors import ValidationFailed
from registry.jobs import JobService
from registry.models import Composition
from registry.schemas import decode_strict
from registry.store import ArtifactStore
from routers.query import RouterContext
from serving.engine import Sampling


def _service(db_session: AsyncSession, store: ArtifactStore) -> CompositionService:
    return CompositionService(db_session, store)


class RouteRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/route: the routing decision for a query, without generating."""

    model: str
    query: str | None = None
    messages: list[dict[str, Any]] | None = None
    trace: bool = False  # token-level routers: every prompt token's adapter weights in every layer

    def as_query(self) -> Query:
        if (self.query is None) == (self.messages is None):
            raise ValidationFailed("give exactly one of `query` and `messages`", param="query")
        chat = self.messages if self.messages is not None else [{"role": "user", "content": self.query}]
        query = Query(self.model, Sampling(), messages=chat)
        if not query.text.strip():
            raise ValidationFailed("the query is empty", param="query" if self.query is not None else "messages")
        return query


class CompositionController(Controller):
    path = "/api/compositions"
    tags = ["compositions"]
    dependencies = {"routing": Provide(provide_router_context, sync_to_thread=False)}

    @get("/", guards=[require_query])
    async def list_compositions(
        self, db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> CompositionList:
        service = _service(db_session, store)
        return CompositionList(data=[await composition_out(service, c) for c in await service.list_compositions()])

    @post("/", guards=[require_admin], status_code=HTTP_201_CREATED)
    async def create_composition(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        routing: NamedDependency[RouterContext],
    ) -> CompositionOut:
        spec: CompositionSpec = decode_strict(await request.body(), CompositionSpec)
        service = _service(db_session, store)
        fitter = router_fitter(db_session, store, routing, defer_slow=True)
        created = await service.create(spec, prepare=fitter)
        return await _with_fit_job(request, service, created, fitter)

    @get("/{name:str}", guards=[require_query])
    async def get_composition(
        self, name: FromPath[str], db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> CompositionOut:
        service = _service(db_session, store)
        return await composition_out(service, await service.get(name))

    @patch("/{name:str}", guards=[require_admin])
    async def update_composition(
        self,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        routing: NamedDependency[RouterContext],
    ) -> CompositionOut:
        changes: CompositionPatch = decode_strict(await request.body(), CompositionPatch)
        service = _service(db_session, store)
        fitter = router_fitter(db_session, store, routing, defer_slow=True)
        updated = await service.update(name, changes, prepare=fitter)
        return await _with_fit_job(request, service, updated, fitter)

    @post("/{name:str}/fit", guards=[require_admin], status_code=HTTP_202_ACCEPTED)
    async def fit(
        self,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
    ) -> JobOut:
        """Queue a `fit` job for the composition's router (its states are fitted again only where its experts
        or their data changed); follow it at /api/jobs/{id}."""
        comp = await _service(db_session, store).get(name)
        job = await queue_fit(db_session, comp.name, comp.router)
        wake_worker(request.app.state)
        return await job_out(JobService(db_session), job)

    @delete("/{name:str}", guards=[require_admin], status_code=HTTP_204_NO_CONTENT)
    async def delete_composition(
        self, name: FromPath[str], db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> None:
        await _service(db_session, store).delete(name)


async def _with_fit_job(
    request: Request[Any, Any, Any], service: CompositionService, comp: Composition, fitter: RouterFitter
) -> CompositionOut:
    """The composition as stored; a slow router fit (``fitter.deferred``) queued as a `fit` job it names."""
    out = await composition_out(service, comp)
    if fitter.deferred:
        job = await queue_fit(service.session, comp.name, comp.router)
        wake_worker(request.app.state)
        out.fit_job = str(job.id)
    return out


class RouteController(Controller):
    path = "/api/route"
    tags = ["compositions"]
    dependencies = {"composer": Provide(provide_composer, sync_to_thread=False)}

    @post("/", guards=[require_query], status_code=HTTP_200_OK)
    async def route(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        composer: NamedDependency[Composer],
    ) -> Response[RouteOut]:
        body: RouteRequest = decode_strict(await request.body(), RouteRequest)
        check_model(request, body.model)  # the key's allow-list, if it has one (api/security.py)
        query = body.as_query()
        started = time.perf_counter()

        def remember(plan: Plan) -> None:  # errors from here on carry these routing headers
            request.state.moerge_route = plan

        stamp = getattr(request.state, "registry_stamp", None)
        plan = await composer.route(db_session, body.model, query.text, stamp=stamp, on_routing=remember)
        took_ms = (time.perf_counter() - started) * 1000
        decision = plan.decision
        assert decision is not None
        result = RouteOut(
            model=plan.model,
            query=query.text,
            router=decision.router,
            experts=[WeightedExpert(slug=slug, weight=weight) for slug, weight in decision.experts],
            scores=decision.scores,
            reason=decision.reason,
            fallback=decision.fallback,
            extra=decision.extra or None,  # absent when the router has nothing more to say
            answered_by=list(plan.experts),
            aggregator=plan.aggregator_name,
            latency_ms=round(took_ms, 3),
        )
        if body.trace:
            check_traceable(plan, param="trace")
            await db_session.close()  # no connection held while the engine runs
            try:
                result.trace = TokenTraceOut.of(await composer.trace(plan, query))
            except ValidationFailed as exc:  # the engine names the chat it was given; this caller sent `query`
                if body.query is not None and exc.param == "messages":
                    exc.param = "query"
                raise
        return Response(result, headers=routing_headers(plan))
