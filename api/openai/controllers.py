"""OpenAI-compatible /v1: models, chat completions (with SSE streaming), completions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.response import Stream
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_composer
from api.metrics.middleware import facts_of
from api.metrics.record import COMPOSITION, note_failures, note_first_token, note_model, note_routing, plan_kind
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
from composition.composer import Composer, check_traceable
from composition.plan import Answer, AnswerStream, MembersFailed, Plan, Query
from core.settings import Settings
from registry.models import Composition, Expert
from registry.schemas import decode_strict
from serving.engine import GenerationFailed

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
ENGINE_HEADER = "x-moerge-engine"  # the engine that wrote the answer: vllm, or torch (mixtures, logit fusion)


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]
    guards = [require_query]
    dependencies = {"composer": Provide(provide_composer, sync_to_thread=False)}

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
        settings: NamedDependency[Settings],
        composer: NamedDependency[Composer],
    ) -> Response[Any]:
        body = decode_strict(await request.body(), ChatCompletionRequest)
        return await _respond(request, db_session, settings, composer, body)

    @post(
        "/completions",
        status_code=200,
        responses={200: ResponseSpec(Completion, description="The answer; with `stream: true`, SSE events")},
    )
    async def completions(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        settings: NamedDependency[Settings],
        composer: NamedDependency[Composer],
    ) -> Response[Any]:
        body = decode_strict(await request.body(), CompletionRequest)
        return await _respond(request, db_session, settings, composer, body)


async def plan_query(
    request: Request[Any, Any, Any], db_session: AsyncSession, composer: Composer, query: Query
) -> Plan:
    """``query``'s plan, as this caller may ask for it: the key's model allow-list first, then the composer
    plans; from here on an error carries the plan's routing headers. /v1 and the admin panel's "try it" box
    and playground plan through here."""

    def remember(plan: Plan) -> None:  # errors from here on carry these routing headers
        request.state.moerge_route = plan
        if plan.router != "none":  # a composition: its request metrics are labelled so even if routing fails
            note_model(request, plan, COMPOSITION)

    check_model(request, query.model)  # before any routing: a key's allow-list names what it may ask for
    stamp = getattr(request.state, "registry_stamp", None)  # read with the API key (api/security.py)
    plan = await composer.plan(db_session, query, stamp=stamp, on_routing=remember)
    note_model(request, plan, await plan_kind(db_session, plan, stamp))
    await db_session.close()  # release the connection before a long generation
    remember(plan)
    note_routing(request, plan)
    return plan


async def _respond(
    request: Request[Any, Any, Any],
    db_session: AsyncSession,
    settings: Settings,
    composer: Composer,
    body: ChatCompletionRequest | CompletionRequest,
) -> Response[Any]:
    run = CompletionRun(chat=isinstance(body, ChatCompletionRequest))
    query = body.as_query(settings.default_max_tokens, run.id)
    run.n = query.sampling.n
    traced = body.checked_trace()
    plan = await plan_query(request, db_session, composer, query)
    if traced:
        check_traceable(plan, param="moerge_trace")
    run.tokens = token_meter(request)  # a key with limits is charged the answer's tokens
    run.kind = facts.kind if (facts := facts_of(request)) is not None else ""
    return await answer(
        request,
        composer,
        plan,
        query,
        stream=body.stream,
        events=lambda stream: run.sse(stream, include_usage=body.include_usage()),
        complete=run.complete,
        traced=traced,
    )


async def answer(
    request: Request[Any, Any, Any],
    composer: Composer,
    plan: Plan,
    query: Query,
    *,
    stream: bool,
    events: Callable[[AnswerStream], AsyncIterator[bytes]],
    complete: Callable[[Answer], Awaitable[Any]],
    traced: bool = False,
) -> Response[Any]:
    """``plan`` answered in an OpenAI shape: ``complete`` makes the body of a whole answer, ``events`` the SSE of a
    stream; with the routing headers (read after the experts answered: a composed answer names failed experts) and
    the engine's. /v1/chat/completions, /v1/completions and /v1/responses answer through here."""
    try:
        if stream:
            started = await composer.stream(plan, query)
            note_first_token(request)
            note_failures(plan, started.failed)
            headers = {**routing_headers(plan, started), ENGINE_HEADER: composer.engine_of(plan), **SSE_HEADERS}
            return Stream(events(started), media_type="text/event-stream", headers=headers)
        done = await composer.answer(plan, query, traced=traced)
    except MembersFailed as exc:  # every chosen member failed
        note_failures(plan, exc.failed)
        raise
    except GenerationFailed:  # a composition's one chosen expert failed (or timed out)
        if not plan.composite:
            note_failures(plan, plan.experts)
        raise
    note_failures(plan, done.failed)
    headers = {**routing_headers(plan, done), ENGINE_HEADER: composer.engine_of(plan)}
    return Response(await complete(done), headers=headers)
