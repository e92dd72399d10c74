"""/api/compositions: create, list, get, update, delete composed systems."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_engine, provide_router_context, runtime_of
from api.openai.serving import routing_headers
from api.schemas import CompositionList, CompositionOut, RouteOut, TokenTraceOut, WeightedExpert, composition_out
from api.security import check_model, require_admin, require_query
from composition.compose import query_text
from composition.mixtures import router_fitter
from composition.resolve import find_composition, resolve_composition, routing_only
from composition.service import CompositionPatch, CompositionService, CompositionSpec
from core.errors import NotFound, ValidationFailed
from registry.epoch import registry_stamp
from registry.schemas import decode_strict
from registry.store import ArtifactStore
from routers.query import RouterContext
from serving.dispatch import trace
from serving.engine import Engine, GenRequest, Sampling


def _service(db_session: AsyncSession, store: ArtifactStore) -> CompositionService:
    return CompositionService(db_session, store)


class RouteRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/route: the routing decision for a query, without generating."""

    model: str
    query: str | None = None
    messages: list[dict[str, Any]] | None = None
    trace: bool = False  # token-level routers: every prompt token's adapter weights in every layer

    def chat(self) -> list[dict[str, Any]]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.query or ""}]

    def text(self) -> str:
        if (self.query is None) == (self.messages is None):
            raise ValidationFailed("give exactly one of `query` and `messages`", param="query")
        text = self.query if self.query is not None else query_text(self.messages, None)
        if not text.strip():
            raise ValidationFailed("the query is empty", param="query" if self.query is not None else "messages")
        return text


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
        created = await service.create(spec, prepare=router_fitter(db_session, store, routing))
        return await composition_out(service, created)

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
        updated = await service.update(name, changes, prepare=router_fitter(db_session, store, routing))
        return await composition_out(service, updated)

    @delete("/{name:str}", guards=[require_admin], status_code=HTTP_204_NO_CONTENT)
    async def delete_composition(
        self, name: FromPath[str], db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> None:
        await _service(db_session, store).delete(name)


class RouteController(Controller):
    path = "/api/route"
    tags = ["compositions"]
    dependencies = {
        "routing": Provide(provide_router_context, sync_to_thread=False),
        "engine": Provide(provide_engine, sync_to_thread=False),
    }

    @post("/", guards=[require_query], status_code=HTTP_200_OK)
    async def route(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        routing: NamedDependency[RouterContext],
        engine: NamedDependency[Engine],
    ) -> Response[RouteOut]:
        body: RouteRequest = decode_strict(await request.body(), RouteRequest)
        check_model(request, body.model)  # the key's allow-list, if it has one (api/security.py)
        query = body.text()
        started = time.perf_counter()
        stamp = getattr(request.state, "registry_stamp", None) or await registry_stamp(db_session)
        comp = await find_composition(db_session, store, body.model, stamp)
        if comp is None:
            raise NotFound(f"no composition named {body.model!r}", param="model", code="composition_not_found")
        request.state.moerge_route = routing_only(comp)
        resolved = await resolve_composition(
            db_session,
            store,
            comp,
            query,
            routing,
            stamp,
            max_lora_rank=runtime_of(request.app.state).settings.max_lora_rank,
        )
        took_ms = (time.perf_counter() - started) * 1000
        decision = resolved.decision
        assert decision is not None
        result = RouteOut(
            model=comp.name,
            query=query,
            router=decision.router,
            experts=[WeightedExpert(slug=slug, weight=weight) for slug, weight in decision.experts],
            scores=decision.scores,
            reason=decision.reason,
            fallback=decision.fallback,
            extra=decision.extra or None,  # absent when the router has nothing more to say
            answered_by=resolved.experts,
            aggregator=resolved.aggregator_name,
            latency_ms=round(took_ms, 3),
        )
        if body.trace:
            if resolved.target.mixture is None:
                raise ValidationFailed(
                    f"a trace shows token-level routes; {comp.name!r} routes per query ({comp.router})", param="trace"
                )
            gen = GenRequest(resolved.target, Sampling(), messages=body.chat(), router_bias=resolved.router_bias)
            result.trace = TokenTraceOut.of(await trace(engine, gen))
        return Response(result, headers=routing_headers(resolved))
