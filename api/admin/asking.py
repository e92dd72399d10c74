"""Queries from the panel ("try it", the playground): planned and answered by the app's composer, as a /v1
chat completion is (the same key checks), read as the typed ``Answer``."""

from __future__ import annotations

from typing import Any

from litestar import Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import provide_composer
from api.openai.controllers import plan_query
from composition.plan import Answer, Query
from core.errors import ValidationFailed
from serving.engine import Sampling

MAX_TOKENS = 64  # the panel asks for short answers; the tiny and demo models answer quickly


async def ask(
    request: Request[Any, Any, Any], db_session: AsyncSession, model: str, text: str, max_tokens: int = MAX_TOKENS
) -> Answer:
    """``text`` asked of ``model`` greedily; a token-level composition's answer carries its trace."""
    if not text.strip():
        raise ValidationFailed("type a message first", param="message")
    composer = provide_composer(request.app.state)
    query = Query(model, Sampling(max_tokens=max_tokens), messages=[{"role": "user", "content": text}])
    plan = await plan_query(request, db_session, composer, query)
    return await composer.answer(plan, query, traced=plan.token_level)
