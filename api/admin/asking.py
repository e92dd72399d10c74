"""Queries from the panel ("try it", the playground) run exactly as a /v1 chat completion does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_engine, provide_router_context
from api.openai.controllers import prepare_chat
from api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    MemberAnswer,
)
from api.schemas import TokenTraceOut
from composition.resolve import Resolved
from core.errors import ValidationFailed
from core.settings import Settings
from registry.store import ArtifactStore

MAX_TOKENS = 64  # the panel asks for short answers; the tiny and demo models answer quickly


@dataclass
class Answer:
    resolved: Resolved
    body: ChatCompletion | Completion

    @property
    def text(self) -> str:
        assert isinstance(self.body, ChatCompletion)  # the panel asks chat completions only
        return self.body.choices[0].message.content

    @property
    def answers(self) -> list[MemberAnswer]:
        """Each chosen expert's own answer (two or more answered), else the one answer."""
        if self.body.moerge is not None and self.body.moerge.answers:
            return list(self.body.moerge.answers)
        slug = self.resolved.experts[0] if self.resolved.experts else self.resolved.model
        return [MemberAnswer(expert=slug, weight=1.0, part=None, text=self.text, error=None)]

    @property
    def trace(self) -> TokenTraceOut | None:
        return self.body.moerge.trace if self.body.moerge is not None else None

    @property
    def aggregation(self) -> str | None:
        return self.body.moerge.aggregation if self.body.moerge is not None else None


async def ask(
    request: Request[Any, Any, Any],
    db_session: AsyncSession,
    store: ArtifactStore,
    settings: Settings,
    model: str,
    text: str,
    max_tokens: int = MAX_TOKENS,
) -> Answer:
    if not text.strip():
        raise ValidationFailed("type a message first", param="message")
    body = ChatCompletionRequest(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0
    )
    state = request.app.state
    run, gen = await prepare_chat(
        request, db_session, store, settings, provide_engine(state), provide_router_context(state), body
    )
    run.trace = run.resolved.target.mixture is not None  # a token-level router: show its per-token choices
    return Answer(run.resolved, await run.complete(gen))
