"""POST /v1/responses: OpenAI's Responses API, stateless, planned and answered as /v1/chat/completions is."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar import Response as HTTPResponse
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_composer
from api.metrics.middleware import facts_of
from api.openai.controllers import answer, plan_query
from api.openai.responses.protocol import Response, ResponsesRequest
from api.openai.responses.serving import ResponseRun
from api.security import require_query, token_meter
from composition.composer import Composer
from core.settings import Settings
from registry.schemas import decode_strict


class ResponsesController(Controller):
    path = "/v1"
    tags = ["openai"]
    guards = [require_query]
    dependencies = {"composer": Provide(provide_composer, sync_to_thread=False)}

    # HTTPResponse[Any]: a Response, or with `stream: true` an SSE stream of the Responses API's events.
    @post(
        "/responses",
        status_code=200,
        responses={200: ResponseSpec(Response, description="The answer; with `stream: true`, SSE events")},
    )
    async def create_response(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        settings: NamedDependency[Settings],
        composer: NamedDependency[Composer],
    ) -> HTTPResponse[Any]:
        body = decode_strict(await request.body(), ResponsesRequest)
        run = ResponseRun(body)
        query = body.as_query(settings.default_max_tokens, run.id)
        plan = await plan_query(request, db_session, composer, query)
        run.tokens = token_meter(request)  # a key with limits is charged the answer's tokens
        run.kind = facts.kind if (facts := facts_of(request)) is not None else ""
        return await answer(request, composer, plan, query, stream=body.stream, events=run.sse, complete=run.complete)
