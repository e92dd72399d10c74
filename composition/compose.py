"""Running a plan on the engines: one answerer's generation, or a composition's members in one engine batch
and then its aggregator; finished (``Answer``) or streamed (``AnswerStream``).

An expert that fails is left out of the aggregate and named in ``Answer.failed`` (the response names it in
``x-moerge-failed``); only when every chosen expert fails does the request fail (``MembersFailed``).

An aggregator with ``fuses_logits`` (``logit_fusion``) is the exception: the chosen experts decode one
answer together, as ONE fused request to the engine (``fused_request``); there is nothing to combine
afterwards, and a member that cannot take part fails the request (naming it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from aggregators import Aggregation, ExpertAnswer
from composition.plan import Answer, AnswerStream, MembersFailed, Plan, Query, answering
from core.errors import MoergeError, Unprocessable
from serving.dispatch import trace
from serving.engine import Engine, FusedMember, GenChunk, GenRequest, GenResult, Sampling


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, MoergeError) else f"{type(exc).__name__}: {exc}"


def _result(out: GenResult | BaseException) -> GenResult:
    if isinstance(out, BaseException):
        raise out
    return out


async def answer_one(engine: Engine, plan: Plan, query: Query, *, traced: bool = False) -> Answer:
    """A plan with one answerer: its generation, and with ``traced`` the token-level trace of it."""
    request = query.generation(plan.target, plan.router_bias)
    (out,) = await engine.generate([request])
    result = _result(out)
    shown = await trace(engine, request, result.text) if traced else None
    return Answer.of(plan, result, plan.experts, plan.weights, trace=shown)


async def answer_members(engine: Engine, plan: Plan, query: Query) -> tuple[ExpertAnswer, ...]:
    """Every chosen expert's answer (to its own part, for a decomposed query), from one ``engine.generate``
    call (one batch on vLLM)."""
    requests = [query.generation(m.target) if m.part is None else query.on_part(m.target, m.part) for m in plan.members]
    results = await engine.generate(requests)
    answers: list[ExpertAnswer] = []
    for member, result in zip(plan.members, results, strict=True):
        if isinstance(result, BaseException):
            answers.append(ExpertAnswer(member.slug, member.weight, error=_describe(result), part=member.part))
        else:
            answers.append(
                ExpertAnswer(
                    member.slug,
                    member.weight,
                    result.text,
                    part=member.part,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                )
            )
    if not any(a.ok for a in answers):
        details = "; ".join(f"{a.slug}: {a.error}" for a in answers)
        raise MembersFailed(f"every chosen expert failed ({details})", tuple(dict.fromkeys(a.slug for a in answers)))
    return tuple(answers)


def aggregator_request(plan: Plan, query: Query, answers: tuple[ExpertAnswer, ...]) -> GenRequest:
    aggregator, target = plan.aggregator, plan.aggregator_target
    assert aggregator is not None and target is not None
    sampling = Sampling(max_tokens=aggregator.max_tokens(query.sampling.max_tokens), temperature=0.0)
    return GenRequest(target, sampling, messages=aggregator.prompt(query.text, list(answers)), request_id="aggregate")


def fused_request(engine: Engine, plan: Plan, query: Query) -> GenRequest:
    """The chosen experts as one fused request (their router weights as the prior), on the first one's base."""
    aggregator = plan.aggregator
    assert aggregator is not None and aggregator.fuses_logits
    if not engine.capabilities.logit_fusion:  # the app's EngineSet sends them to its torch engine
        raise Unprocessable(
            f"composition {plan.model!r}: aggregator {plan.aggregator_name!r} decodes the experts "
            f"together, which only the torch engine can do; this server runs the {engine.name} engine",
            param="model",
            code="fusion_unsupported",
        )
    members = tuple(FusedMember(m.slug, m.target, m.weight) for m in plan.members)
    return dataclasses.replace(query.generation(members[0].target), fusion=aggregator.fusion(members))


async def compose_fused(engine: Engine, plan: Plan, query: Query) -> Answer:
    (out,) = await engine.generate([fused_request(engine, plan, query)])
    result = _result(out)
    summary = result.extra.get("fusion") or {}
    mean = summary.get("mean_weights") or {}
    shown = ", ".join(f"{slug} {weight:.3g}" for slug, weight in mean.items())
    aggregation = Aggregation(
        result.text,
        [m.slug for m in plan.members],
        reason=f"the experts decoded one answer together ({summary.get('mode', '?')} logit fusion; "
        f"mean weights per step: {shown})",
        extra={"fusion": summary},
    )
    # Every member decoded the same tokens: each one's answer is the fused text (the usage is the answer's).
    answers = tuple(ExpertAnswer(m.slug, m.weight, result.text) for m in plan.members)
    experts, weights = answering(plan, answers, aggregation.chosen)
    return Answer.of(plan, result, experts, weights, members=answers, aggregation=aggregation)


async def compose(engine: Engine, plan: Plan, query: Query) -> Answer:
    """A composite plan's answer: the members', then the aggregate (usage: every generation's tokens)."""
    aggregator = plan.aggregator
    assert aggregator is not None
    if aggregator.fuses_logits:
        return await compose_fused(engine, plan, query)
    answers = await answer_members(engine, plan, query)
    prompt_tokens = sum(a.prompt_tokens for a in answers)
    completion_tokens = sum(a.completion_tokens for a in answers)
    finish_reason = "stop"
    if aggregator.uses_model:
        (out,) = await engine.generate([aggregator_request(plan, query, answers)])
        result = _result(out)
        aggregation = aggregator.finish(query.text, list(answers), result.text)
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
        finish_reason = result.finish_reason
    else:
        aggregation = aggregator.combine(query.text, list(answers))
    experts, weights = answering(plan, answers, aggregation.chosen)
    return Answer(
        plan, aggregation.text, finish_reason, prompt_tokens, completion_tokens, experts, weights, answers, aggregation
    )


async def stream_one(engine: Engine, plan: Plan, query: Query) -> AnswerStream:
    chunks = engine.stream(query.generation(plan.target, plan.router_bias))
    return await started(plan, chunks, plan.experts, plan.weights)


async def compose_stream(engine: Engine, plan: Plan, query: Query) -> AnswerStream:
    """The experts answer first (so the headers can name failures); then the aggregate streams: the
    aggregator model's own stream when its output is the answer, else the final answer in one chunk."""
    aggregator = plan.aggregator
    assert aggregator is not None
    if aggregator.fuses_logits:  # one fused decode: its own stream is the answer's
        request = fused_request(engine, plan, query)
        experts, weights = answering(plan, (), [m.slug for m in plan.members])
        return await started(plan, engine.stream(request), experts, weights)
    if aggregator.uses_model and aggregator.streams_output:
        answers = await answer_members(engine, plan, query)
        experts, weights = answering(plan, answers, [a.slug for a in answers if a.ok])
        failed = tuple(dict.fromkeys(a.slug for a in answers if not a.ok))
        return await started(plan, engine.stream(aggregator_request(plan, query, answers)), experts, weights, failed)
    done = await compose(engine, plan, query)
    return await started(plan, _one_chunk(done), done.experts, done.weights, done.failed)


async def started(
    plan: Plan,
    chunks: AsyncIterator[GenChunk],
    experts: tuple[str, ...],
    weights: tuple[float, ...],
    failed: tuple[str, ...] = (),
) -> AnswerStream:
    """The stream with its first chunk awaited: a failure to start (engine down, unknown adapter) is raised
    here, while the caller can still answer with an HTTP error status."""
    rest = chunks.__aiter__()
    first = await rest.__anext__()
    return AnswerStream(plan, first, rest, experts, weights, failed)


async def _one_chunk(done: Answer) -> AsyncIterator[GenChunk]:
    yield GenChunk(done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens)
