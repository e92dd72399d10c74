"""OpenAI-compatible /v1: models, chat completions (with SSE streaming), completions."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.response import Stream
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_engine, provide_router_context, runtime_of
from api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelInfo,
    ModelList,
)
from api.openai.serving import CompletionRun, routing_headers
from api.security import check_model, grant_of, require_query, token_meter
from composition.compose import query_text
from composition.resolve import Resolved, resolve_model
from core.settings import Settings
from registry.models import Composition, Expert
from registry.schemas import decode_strict
from registry.store import ArtifactStore
from routers.query import RouterContext
from serving.engine import Engine, GenRequest

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]
    guards = [require_query]
    dependencies = {
        "engine": Provide(provide_engine, sync_to_thread=False),
        "routing": Provide(provide_router_context, sync_to_thread=False),
    }

    @get("/models")
    async def list_models(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession]
    ) -> ModelList:
        grant = grant_of(request)
        allowed = grant.models if grant is not None else None  # a key with an allow-list sees only those
        experts = list(await db_session.scalars(select(Expert).order_by(Expert.created_at)))
        data = [
            ModelCard(
                id=e.slug,
                created=int(e.created_at.timestamp()),
                owned_by=e.owner or "moerge",
                root=e.slug,
                parent=e.base.slug if e.base is not None else None,
                moerge=ModelInfo(kind=e.kind, expert_id=str(e.id)),
            )
            for e in experts
        ]
        for c in await db_session.scalars(select(Composition).order_by(Composition.name)):
            data.append(
                ModelCard(
                    id=c.name,
                    created=int(c.created_at.timestamp()),
                    owned_by="moerge",
                    root=c.name,
                    parent=None,
                    moerge=ModelInfo(kind="composition", router=c.router, k=c.k),
                )
            )
        if allowed is not None:
            data = [entry for entry in data if entry.id in allowed]
        return ModelList(data=data)

    # Response[Any]: a ChatCompletion, or with `stream: true` an SSE stream of ChatCompletionChunk events.
    @post(
        "/chat/completions",
        status_code=200,
        responses={200: ResponseSpec(ChatCompletion, description="The answer; with `stream: true`, SSE events")},
    )
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        settings: NamedDependency[Settings],
        engine: NamedDependency[Engine],
        routing: NamedDependency[RouterContext],
    ) -> Response[Any]:
        body: ChatCompletionRequest = decode_strict(await request.body(), ChatCompletionRequest)
        run, gen = await prepare_chat(request, db_session, store, settings, engine, routing, body)
        return await _respond(run, gen, body.stream, body.include_usage())

    @post(
        "/completions",
        status_code=200,
        responses={200: ResponseSpec(Completion, description="The answer; with `stream: true`, SSE events")},
    )
    async def completions(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        settings: NamedDependency[Settings],
        engine: NamedDependency[Engine],
        routing: NamedDependency[RouterContext],
    ) -> Response[Any]:
        body: CompletionRequest = decode_strict(await request.body(), CompletionRequest)
        prompt = body.checked_prompt()
        sampling = body.sampling(settings.default_max_tokens)
        resolved = await _resolve(request, db_session, store, routing, body.model, prompt)
        run = CompletionRun(engine, resolved, sampling, query=prompt, chat=False, trace=body.checked_trace())
        run.tokens = token_meter(request)
        return await _respond(run, run.request(prompt=prompt), body.stream, body.include_usage())


async def prepare_chat(
    request: Request[Any, Any, Any],
    db_session: AsyncSession,
    store: ArtifactStore,
    settings: Settings,
    engine: Engine,
    routing: RouterContext,
    body: ChatCompletionRequest,
) -> tuple[CompletionRun, GenRequest]:
    """A chat request checked, its model resolved (a composition routed): ready to run. /v1 and the admin
    panel's "try it" box and playground both go through here."""
    messages = body.checked_messages()
    sampling = body.sampling(settings.default_max_tokens)
    query = query_text(messages, None)  # once: routing and the aggregator read the same text
    resolved = await _resolve(request, db_session, store, routing, body.model, query)
    run = CompletionRun(engine, resolved, sampling, query=query, chat=True, trace=body.checked_trace())
    run.tokens = token_meter(request)  # a key with limits is charged the answer's tokens
    return run, run.request(messages=messages)


async def _resolve(
    request: Request[Any, Any, Any],
    db_session: AsyncSession,
    store: ArtifactStore,
    routing: RouterContext,
    model: str,
    query: str,
) -> Resolved:
    def remember(resolved: Resolved) -> None:  # errors from here on carry these routing headers
        request.state.moerge_route = resolved

    check_model(request, model)  # before any routing: a key's allow-list names what it may ask for
    stamp = getattr(request.state, "registry_stamp", None)  # read with the API key (api/security.py)
    resolved = await resolve_model(
        db_session,
        store,
        model,
        query=query,
        context=routing,
        on_composition=remember,
        stamp=stamp,
        max_lora_rank=runtime_of(request.app.state).settings.max_lora_rank,
    )
    await db_session.close()  # release the connection before a long generation
    remember(resolved)
    return resolved


async def _respond(run: CompletionRun, gen: Any, stream: bool, include_usage: bool) -> Response[Any]:
    # Headers are read after the experts have answered: a composed answer names failed experts.
    if stream:
        events = await run.open_stream(gen, include_usage=include_usage)
        headers = {**routing_headers(run.resolved), **SSE_HEADERS}
        return Stream(events, media_type="text/event-stream", headers=headers)
    body = await run.complete(gen)
    return Response(body, headers=routing_headers(run.resolved))
