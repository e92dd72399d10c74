"""Queries from the panel ("try it", the playground) run exactly as a /v1 chat completion does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_engine, provide_router_context
from api.openai.controllers import prepare_chat
from api.openai.protocol import ChatCompletionRequest
from composition.resolve import Resolved
from core.errors import ValidationFailed
from core.settings import Settings
from registry.store import ArtifactStore

MAX_TOKENS = 64  # the panel asks for short answers; the tiny and demo models answer quickly


@dataclass
class Answer:
    resolved: Resolved
    body: dict[str, Any]

    @property
    def text(self) -> str:
        return str(self.body["choices"][0]["message"]["content"])

    @property
    def answers(self) -> list[dict[str, Any]]:
        """Each chosen expert's own answer (two or more answered), else the one answer."""
        extra = self.body.get("moerge") or {}
        if extra.get("answers"):
            return list(extra["answers"])
        slug = self.resolved.experts[0] if self.resolved.experts else self.resolved.model
        return [{"expert": slug, "weight": 1.0, "part": None, "text": self.text, "error": None}]

    @property
    def trace(self) -> dict[str, Any] | None:
        found = (self.body.get("moerge") or {}).get("trace")
        return dict(found) if found else None

    @property
    def aggregation(self) -> str | None:
        return (self.body.get("moerge") or {}).get("aggregation")


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
