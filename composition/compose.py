"""Serving a composed answer: the chosen experts in one engine batch, then the aggregator.

An expert that fails is left out of the aggregate and reported in ``Resolved.failed`` (the response
names it in ``x-moerge-failed``); only when every chosen expert fails does the request fail.

An aggregator with ``fuses_logits`` (``logit_fusion``) is the exception: the chosen experts decode one
answer together, as ONE fused request to the engine (``fused_request``); there is nothing to combine
afterwards, and a member that cannot take part fails the request (naming it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aggregators import Aggregation, ExpertAnswer
from composition.resolve import Resolved, target_of_slug
from core.errors import MoergeError, Unprocessable
from registry.store import ArtifactStore
from routers.query import RouterContext
from routers.query.base import Embedder
from serving.engine import Engine, FusedMember, GenChunk, GenerationFailed, GenRequest, GenResult, Sampling, Target


@dataclass
class ComposedAnswer:
    aggregation: Aggregation
    answers: list[ExpertAnswer]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, MoergeError) else f"{type(exc).__name__}: {exc}"


async def answer_members(
    engine: Engine, resolved: Resolved, build: Callable[[Target], GenRequest]
) -> tuple[list[ExpertAnswer], list[GenResult]]:
    """Every chosen expert's answer (to its own part, for a decomposed query), from one ``engine.generate``
    call (one batch on vLLM)."""
    requests = [build(m.target) if m.part is None else asking(build(m.target), m.part) for m in resolved.members]
    results = await engine.generate(requests)
    answers: list[ExpertAnswer] = []
    ok: list[GenResult] = []
    for member, result in zip(resolved.members, results, strict=True):
        if isinstance(result, BaseException):
            answers.append(ExpertAnswer(member.slug, member.weight, error=_describe(result), part=member.part))
            if member.slug not in resolved.failed:
                resolved.failed.append(member.slug)
        else:
            answers.append(ExpertAnswer(member.slug, member.weight, result.text, part=member.part))
            ok.append(result)
    if not ok:
        details = "; ".join(f"{a.slug}: {a.error}" for a in answers)
        raise GenerationFailed(f"every chosen expert failed ({details})", param="model")
    return answers, ok


def asking(request: GenRequest, part: str) -> GenRequest:
    """``request`` with its query replaced by one part of it: the last user message of a chat (system
    messages stay), or a completion's prompt."""
    if request.messages is None:
        return dataclasses.replace(request, prompt=part)
    messages = [m for m in request.messages if m.get("role") in ("system", "developer")]
    return dataclasses.replace(request, messages=[*messages, {"role": "user", "content": part}])


def aggregator_request(resolved: Resolved, query: str, answers: list[ExpertAnswer], sampling: Sampling) -> GenRequest:
    aggregator, target = resolved.aggregator, resolved.aggregator_target
    assert aggregator is not None and target is not None
    agg_sampling = Sampling(max_tokens=aggregator.max_tokens(sampling.max_tokens), temperature=0.0)
    return GenRequest(target, agg_sampling, messages=aggregator.prompt(query, answers), request_id="aggregate")


def _name_answering_experts(resolved: Resolved, aggregation: Aggregation) -> None:
    """The headers name the experts the answer came from."""
    chosen = [m for m in resolved.members if m.slug in aggregation.chosen] or [
        m for m in resolved.members if m.slug not in resolved.failed
    ]
    weights: dict[str, float] = {}  # an expert answering several parts is named once, with their weights
    for member in chosen:
        weights[member.slug] = weights.get(member.slug, 0.0) + member.weight
    resolved.experts = list(weights)
    resolved.weights = [round(w, 6) for w in weights.values()]


def fused_request(engine: Engine, resolved: Resolved, build: Callable[[Target], GenRequest]) -> GenRequest:
    """The chosen experts as one fused request (their router weights as the prior), on the first one's base."""
    aggregator = resolved.aggregator
    assert aggregator is not None and aggregator.fuses_logits
    if not engine.capabilities.logit_fusion:  # the app's EngineSet sends them to its torch engine
        raise Unprocessable(
            f"composition {resolved.model!r}: aggregator {resolved.aggregator_name!r} decodes the experts "
            f"together, which only the torch engine can do; this server runs the {engine.name} engine",
            param="model",
            code="fusion_unsupported",
        )
    members = tuple(FusedMember(m.slug, m.target, m.weight) for m in resolved.members)
    return dataclasses.replace(build(members[0].target), fusion=aggregator.fusion(members))


async def compose_fused(engine: Engine, resolved: Resolved, build: Callable[[Target], GenRequest]) -> ComposedAnswer:
    (result,) = await engine.generate([fused_request(engine, resolved, build)])
    if isinstance(result, BaseException):
        raise result
    summary = result.extra.get("fusion") or {}
    mean = summary.get("mean_weights") or {}
    shown = ", ".join(f"{slug} {weight:.3g}" for slug, weight in mean.items())
    aggregation = Aggregation(
        result.text,
        [m.slug for m in resolved.members],
        reason=f"the experts decoded one answer together ({summary.get('mode', '?')} logit fusion; "
        f"mean weights per step: {shown})",
        extra={"fusion": summary},
    )
    _name_answering_experts(resolved, aggregation)
    # Every member decoded the same tokens: each one's answer is the fused text.
    answers = [ExpertAnswer(m.slug, m.weight, result.text) for m in resolved.members]
    return ComposedAnswer(aggregation, answers, result.prompt_tokens, result.completion_tokens, result.finish_reason)


async def compose(
    engine: Engine, resolved: Resolved, query: str, build: Callable[[Target], GenRequest], sampling: Sampling
) -> ComposedAnswer:
    if resolved.aggregator is not None and resolved.aggregator.fuses_logits:
        return await compose_fused(engine, resolved, build)
    answers, results = await answer_members(engine, resolved, build)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    aggregator = resolved.aggregator
    assert aggregator is not None
    finish_reason = "stop"
    if aggregator.uses_model:
        (out,) = await engine.generate([aggregator_request(resolved, query, answers, sampling)])
        if isinstance(out, BaseException):
            raise out
        aggregation = aggregator.finish(query, answers, out.text)
        prompt_tokens += out.prompt_tokens
        completion_tokens += out.completion_tokens
        finish_reason = out.finish_reason
    else:
        aggregation = aggregator.combine(query, answers)
    _name_answering_experts(resolved, aggregation)
    return ComposedAnswer(aggregation, answers, prompt_tokens, completion_tokens, finish_reason)


async def compose_stream(
    engine: Engine, resolved: Resolved, query: str, build: Callable[[Target], GenRequest], sampling: Sampling
) -> AsyncIterator[GenChunk]:
    """The experts answer first (so the headers can name failures); then the aggregate streams: the
    aggregator model's own stream when its output is the answer, else the final answer in one chunk."""
    aggregator = resolved.aggregator
    assert aggregator is not None
    if aggregator.fuses_logits:  # one fused decode: its own stream is the answer's
        request = fused_request(engine, resolved, build)
        _name_answering_experts(resolved, Aggregation("", [m.slug for m in resolved.members]))
        return engine.stream(request)
    if aggregator.uses_model and aggregator.streams_output:
        answers, _ = await answer_members(engine, resolved, build)
        _name_answering_experts(resolved, Aggregation("", [a.slug for a in answers if a.ok]))
        return engine.stream(aggregator_request(resolved, query, answers, sampling))
    done = await compose(engine, resolved, query, build, sampling)
    return _one_chunk(done)


async def _one_chunk(done: ComposedAnswer) -> AsyncIterator[GenChunk]:
    yield GenChunk(done.aggregation.text, done.finish_reason, done.prompt_tokens, done.completion_tokens)


def router_context(
    engine: Engine | None,
    sessionmaker: async_sessionmaker[AsyncSession],
    store: ArtifactStore,
    embedder: Embedder,
    default_model: str | None = None,
) -> RouterContext:
    """A RouterContext whose ``generate`` runs a registered expert greedily on this app's engine."""
    if engine is None:
        return RouterContext(embedder=embedder, default_model=default_model)

    async def generate(slug: str, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        async with sessionmaker() as session:
            target = await target_of_slug(session, store, slug, param="model")
        (result,) = await engine.generate([GenRequest(target, Sampling(max_tokens=max_new_tokens), messages)])
        if isinstance(result, BaseException):
            raise result
        return result.text

    return RouterContext(embedder=embedder, generate=generate, default_model=default_model)


def query_text(messages: list[dict[str, Any]] | None, prompt: str | None) -> str:
    """What routers read: the last user message of a chat, or a completion's prompt."""
    if messages:
        for message in reversed(messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
        return str(messages[-1].get("content") or "")
    return prompt or ""
