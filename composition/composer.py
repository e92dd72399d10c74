"""The one way a query is answered: ``Composer.plan`` (resolve the model name; route a composition), then
``answer`` or ``stream`` on the engines. /v1, /api/route, the admin panel's "try it" box and playground all
go through a ``Composer``; the CLI's ``moerge query`` and ``moerge eval`` reach it over /v1.

Planning runs in a ``resolve`` span (a composition's routing in a ``route`` span inside it: composition/resolve.py);
the generations in the spans composition/compose.py makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from opentelemetry.trace import Span
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from composition.compose import answer_one, compose, compose_stream, generate_one, stream_one
from composition.plan import Answer, AnswerStream, Plan, Query
from composition.resolve import find_composition, resolve_composition, resolve_model, routing_only, target_of_slug
from composition.support import check_supported
from core import tracing
from core.errors import MoergeError, NotFound, ValidationFailed
from core.settings import MAX_GENERATION_S
from registry.epoch import Stamp, registry_stamp
from registry.limits import MAX_LORA_RANK
from registry.store import ArtifactStore
from routers.query import RouterContext
from routers.query.base import Embedder
from serving.dispatch import answering_engine, trace
from serving.engine import Engine, GenChunk, GenerationTimedOut, GenRequest, Sampling, TokenTrace

OnRouting = Callable[[Plan], None]  # hears what is known before routing, so errors can carry the headers


class Composer:
    """Plans and runs queries on ``engine`` (None: a composer that can plan and route, not answer).
    ``max_lora_rank``: MOERGE_MAX_LORA_RANK; an adapter above it is refused while planning.
    ``max_generation_s``: MOERGE_MAX_GENERATION_S; a generation (an answer with its members and aggregate, a
    stream to its end, a trace) still running after it is stopped (``GenerationTimedOut``, a 504)."""

    def __init__(
        self,
        engine: Engine | None,
        store: ArtifactStore,
        context: RouterContext,
        *,
        max_lora_rank: int = MAX_LORA_RANK,
        max_generation_s: float = MAX_GENERATION_S,
    ) -> None:
        self._engine = engine
        self.store = store
        self.context = context
        self.max_lora_rank = max_lora_rank
        self.max_generation_s = max_generation_s

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise MoergeError("no serving engine is configured in this app", param="engine")
        return self._engine

    def engine_of(self, plan: Plan) -> str:
        """The engine that writes ``plan``'s answer (the x-moerge-engine header): the torch engine for logit fusion
        and for a mixture vLLM cannot run as a slot, else the app's engine (vllm, or torch)."""
        fused = plan.aggregator is not None and plan.aggregator.fuses_logits
        return answering_engine(self.engine, plan.target, fused=fused)

    async def plan(
        self, session: AsyncSession, query: Query, *, stamp: Stamp | None = None, on_routing: OnRouting | None = None
    ) -> Plan:
        """What answers ``query``: an expert, or a composition routed on ``query.text``. ``stamp``: the
        registry stamp if the caller read it already (the API's key check reads it in the same statement)."""
        with tracing.tracer.start_as_current_span("resolve", attributes={tracing.MODEL: query.model}) as span:
            if query.merged_adapters is not None:
                from composition.mixtures import merged_adapters_plan

                plan = await merged_adapters_plan(
                    session, self.store, query.model, query.merged_adapters, stamp, max_lora_rank=self.max_lora_rank
                )
                _describe(span, plan)
                return plan
            plan = await resolve_model(
                session,
                self.store,
                query.model,
                query=query.text,
                context=self.context,
                on_composition=on_routing,
                stamp=stamp,
                max_lora_rank=self.max_lora_rank,
            )
            _describe(span, plan)
            return plan

    async def route(
        self,
        session: AsyncSession,
        model: str,
        text: str,
        *,
        stamp: Stamp | None = None,
        on_routing: OnRouting | None = None,
    ) -> Plan:
        """A composition's plan for ``text``, without generating (/api/route)."""
        with tracing.tracer.start_as_current_span("resolve", attributes={tracing.MODEL: model}) as span:
            stamp = stamp if stamp is not None else await registry_stamp(session)
            comp = await find_composition(session, self.store, model, stamp)
            if comp is None:
                raise NotFound(f"no composition named {model!r}", param="model", code="composition_not_found")
            if on_routing is not None:
                on_routing(routing_only(comp))
            plan = await resolve_composition(
                session, self.store, comp, text, self.context, stamp, max_lora_rank=self.max_lora_rank
            )
            _describe(span, plan)
            return plan

    async def answer(self, plan: Plan, query: Query, *, traced: bool = False) -> Answer:
        """``plan`` run to the end; ``traced``: with the token-level trace (a token-level plan only)."""
        check_supported(self.engine, plan, query)
        async with _time_limit(self._deadline(), self.max_generation_s):
            if plan.composite:
                return await compose(self.engine, plan, query)
            return await answer_one(self.engine, plan, query, traced=traced)

    async def stream(self, plan: Plan, query: Query) -> AnswerStream:
        """``plan`` run as a stream, started (its first chunk arrived); the time limit covers it to its end."""
        check_supported(self.engine, plan, query)
        deadline = self._deadline()
        async with _time_limit(deadline, self.max_generation_s):
            if plan.composite:
                stream = await compose_stream(self.engine, plan, query)
            else:
                stream = await stream_one(self.engine, plan, query)
        return dataclasses.replace(stream, rest=_until(stream.rest, deadline, self.max_generation_s))

    async def trace(self, plan: Plan, query: Query) -> TokenTrace:
        """The token-level trace of ``query``'s prompt (no generation)."""
        async with _time_limit(self._deadline(), self.max_generation_s):
            return await trace(self.engine, query.generation(plan.target, plan.router_bias))

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.max_generation_s


def _describe(span: Span, plan: Plan) -> None:
    """What the name resolved to, on its ``resolve`` span."""
    if span.is_recording():
        span.set_attributes({tracing.ROUTER: plan.router, tracing.EXPERTS: list(plan.experts)})


@contextlib.asynccontextmanager
async def _time_limit(deadline: float, seconds: float) -> AsyncIterator[None]:
    """The block, stopped when the loop's clock reaches ``deadline`` (``seconds`` after it began), which is
    then ``GenerationTimedOut``; a TimeoutError from anything else inside is left as it is."""
    limit = asyncio.timeout_at(deadline)
    try:
        async with limit:
            yield
    except TimeoutError:
        if not limit.expired():
            raise
        raise GenerationTimedOut(
            f"the generation was stopped after {seconds:g} s (MOERGE_MAX_GENERATION_S)", code="generation_timeout"
        ) from None


async def _until(chunks: AsyncIterator[GenChunk], deadline: float, seconds: float) -> AsyncIterator[GenChunk]:
    """``chunks`` until the loop's clock reaches ``deadline``; then the stream is closed (which stops its
    generation) and ends with ``GenerationTimedOut``."""
    try:
        while True:
            async with _time_limit(deadline, seconds):
                chunk = await anext(chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def check_traceable(plan: Plan, *, param: str) -> None:
    """A trace shows a token-level router's per-token choices: refuse it for anything else, naming ``param``."""
    if not plan.token_level:
        why = f"routes per query ({plan.router})" if plan.router != "none" else "has no token-level router"
        raise ValidationFailed(f"a trace shows token-level routes; {plan.model!r} {why}", param=param)


def router_context(
    engine: Engine | None,
    sessionmaker: async_sessionmaker[AsyncSession],
    store: ArtifactStore,
    embedder: Embedder,
    default_model: str | None = None,
    *,
    max_generation_s: float = MAX_GENERATION_S,
) -> RouterContext:
    """A RouterContext whose ``generate`` runs a registered expert greedily on this app's engine (the
    `instruct` router's task descriptions)."""
    if engine is None:
        return RouterContext(embedder=embedder, default_model=default_model)

    async def generate(slug: str, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        async with sessionmaker() as session:
            target = await target_of_slug(session, store, slug, param="model")
        deadline = asyncio.get_running_loop().time() + max_generation_s
        async with _time_limit(deadline, max_generation_s):
            result = await generate_one(engine, GenRequest(target, Sampling(max_tokens=max_new_tokens), messages))
        return result.text

    return RouterContext(embedder=embedder, generate=generate, default_model=default_model)
