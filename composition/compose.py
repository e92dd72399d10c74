"""Running a plan on the engines: one answerer's generation, or a composition's members in one engine batch
and then its aggregator; finished (``Answer``) or streamed (``AnswerStream``).

An expert that fails is left out of the aggregate and named in ``Answer.failed`` (the response names it in
``x-moerge-failed``); only when every chosen expert fails does the request fail (``MembersFailed``).

An aggregator with ``fuses_logits`` (``logit_fusion``) is the exception: the chosen experts decode one
answer together, as ONE fused request to the engine (``fused_request``); there is nothing to combine
afterwards, and a member that cannot take part fails the request (naming it).

Each generation runs in its own ``generate`` span (a composition's members concurrently: the engines batch
concurrent requests, and each vLLM request carries its own member's trace context), the aggregator's work in an
``aggregate`` span; a streamed one's span lasts until its stream ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any

from opentelemetry.trace import Span, use_span
from opentelemetry.util.types import AttributeValue

from aggregators import Aggregation, Aggregator, ExpertAnswer
from composition.plan import Answer, AnswerStream, Member, MembersFailed, Plan, Query, answering
from core import tracing
from core.errors import MoergeError, Unprocessable, ValidationFailed
from serving.dispatch import answering_engine, trace
from serving.engine import Choice, Engine, FusedMember, GenChunk, GenRequest, GenResult, Guidance, Sampling


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, MoergeError) else f"{type(exc).__name__}: {exc}"


def _result(out: GenResult | BaseException) -> GenResult:
    if isinstance(out, BaseException):
        raise out
    return out


def _generation(engine: Engine, request: GenRequest) -> dict[str, AttributeValue]:
    """A generation span's attributes: what runs it, on which engine."""
    return {
        tracing.EXPERT: request.target.served_name,
        tracing.ENGINE: answering_engine(engine, request.target, fused=request.fusion is not None),
    }


def _usage(span: Span, prompt_tokens: int | None, completion_tokens: int | None) -> None:
    if span.is_recording() and prompt_tokens is not None and completion_tokens is not None:
        span.set_attributes({tracing.INPUT_TOKENS: prompt_tokens, tracing.OUTPUT_TOKENS: completion_tokens})


async def generate_one(engine: Engine, request: GenRequest) -> GenResult:
    """One request's generation in its own span; a failure raised (and so recorded on the span)."""
    with tracing.tracer.start_as_current_span("generate", attributes=_generation(engine, request)) as span:
        (out,) = await engine.generate([request])
        result = _result(out)
        _usage(span, result.prompt_tokens, result.completion_tokens)
        return result


async def answer_one(engine: Engine, plan: Plan, query: Query, *, traced: bool = False) -> Answer:
    """A plan with one answerer: its generation, and with ``traced`` the token-level trace of it."""
    request = query.generation(plan.target, plan.router_bias, plan.mixture_weights)
    result = await generate_one(engine, request)
    shown = await trace(engine, request, result.text) if traced else None
    return Answer.of(plan, result, plan.experts, plan.weights, trace=shown)


async def _member(engine: Engine, member: Member, request: GenRequest) -> GenResult | BaseException:
    """One member's generation in its own span; a failure is returned (the others go on), and recorded."""
    attributes = {**_generation(engine, request), tracing.EXPERT: member.slug, tracing.WEIGHT: member.weight}
    with tracing.tracer.start_as_current_span("generate", attributes=attributes) as span:
        (out,) = await engine.generate([request])
        if isinstance(out, BaseException):
            tracing.record_failure(span, out, _describe(out))
        else:
            _usage(span, out.prompt_tokens, out.completion_tokens)
        return out


async def answer_members(engine: Engine, plan: Plan, query: Query) -> tuple[ExpertAnswer, ...]:
    """Every chosen expert's answer (to its own part, for a decomposed query), generated concurrently: the
    engines batch concurrent requests (the torch engine in one batch, vLLM in its own scheduler). Each gets the
    request's guidance (JSON, tools); an echoed prompt is added to the aggregate once, not to each answer."""
    if query.sampling.echo:
        query = dataclasses.replace(query, sampling=dataclasses.replace(query.sampling, echo=False))
    requests = [query.generation(m.target) if m.part is None else query.on_part(m.target, m.part) for m in plan.members]
    results = await asyncio.gather(*(_member(engine, m, r) for m, r in zip(plan.members, requests, strict=True)))
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
                    tool_calls=result.all_choices()[0].tool_calls,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                )
            )
    if not any(a.ok for a in answers):
        refusals = [r for r in results if isinstance(r, ValidationFailed)]
        if len(refusals) == len(results):  # the request itself is wrong for every member: the caller's 400
            raise refusals[0]
        details = "; ".join(f"{a.slug}: {a.error}" for a in answers)
        raise MembersFailed(f"every chosen expert failed ({details})", tuple(dict.fromkeys(a.slug for a in answers)))
    return tuple(answers)


def structured(query: Query) -> bool:
    """The request asks for a JSON answer or tool calls: answers are compared as parsed values."""
    return query.guidance is not None and (query.guidance.structured or query.guidance.calls_tools)


def aggregator_of(plan: Plan, query: Query) -> Aggregator:
    """The plan's aggregator as it combines this query's answers (JSON ones compared parsed)."""
    aggregator = plan.aggregator
    assert aggregator is not None
    return aggregator.for_structured() if structured(query) else aggregator


def aggregator_request(plan: Plan, query: Query, answers: tuple[ExpertAnswer, ...]) -> GenRequest:
    """The aggregator model's generation; one that writes the answer (``streams_output``) writes it in the format
    the request asked for."""
    aggregator, target = plan.aggregator, plan.aggregator_target
    assert aggregator is not None and target is not None
    sampling = Sampling(max_tokens=aggregator.max_tokens(query.sampling.max_tokens), temperature=0.0)
    guidance = None
    if aggregator.streams_output and query.guidance is not None and query.guidance.response_format is not None:
        guidance = Guidance(response_format=query.guidance.response_format)
    messages = aggregator.prompt(query.text, list(answers))
    return GenRequest(target, sampling, messages=messages, request_id="aggregate", guidance=guidance)


def echoed(query: Query, text: str) -> str:
    """A text completion asked with ``echo``: the prompt, then the answer."""
    return (query.prompt or "") + text if query.sampling.echo else text


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
    request = fused_request(engine, plan, query)
    attributes = {**_generation(engine, request), tracing.EXPERTS: [m.slug for m in plan.members]}
    with tracing.tracer.start_as_current_span("generate", attributes=attributes) as span:
        (out,) = await engine.generate([request])
        result = _result(out)
        _usage(span, result.prompt_tokens, result.completion_tokens)
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
    aggregator = aggregator_of(plan, query)
    if aggregator.fuses_logits:
        return await compose_fused(engine, plan, query)
    answers = await answer_members(engine, plan, query)
    prompt_tokens = sum(a.prompt_tokens for a in answers)
    completion_tokens = sum(a.completion_tokens for a in answers)
    finish_reason = "stop"
    with tracing.tracer.start_as_current_span("aggregate", attributes=_aggregating(plan)) as span:
        if aggregator.uses_model:
            request = aggregator_request(plan, query, answers)
            span.set_attributes(_generation(engine, request))
            (out,) = await engine.generate([request])
            result = _result(out)
            _usage(span, result.prompt_tokens, result.completion_tokens)
            aggregation = aggregator.finish(query.text, list(answers), result.text)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            finish_reason = result.finish_reason
        else:
            aggregation = aggregator.combine(query.text, list(answers))
        span.set_attribute(tracing.CHOSEN, list(aggregation.chosen))
    experts, weights = answering(plan, answers, aggregation.chosen)
    if aggregation.tool_calls:
        finish_reason = "tool_calls"
    text = echoed(query, aggregation.text)
    choice = Choice(0, text, finish_reason, tool_calls=aggregation.tool_calls)
    return Answer(
        plan,
        text,
        finish_reason,
        prompt_tokens,
        completion_tokens,
        experts,
        weights,
        answers,
        aggregation,
        choices=(choice,),
    )


def _aggregating(plan: Plan) -> dict[str, AttributeValue]:
    return {tracing.AGGREGATOR: plan.aggregator_name or ""}


async def stream_one(engine: Engine, plan: Plan, query: Query) -> AnswerStream:
    request = query.generation(plan.target, plan.router_bias, plan.mixture_weights)
    chunks = engine.stream(request)
    return await started(plan, chunks, plan.experts, plan.weights, span=("generate", _generation(engine, request)))


async def compose_stream(engine: Engine, plan: Plan, query: Query) -> AnswerStream:
    """The experts answer first (so the headers can name failures); then the aggregate streams: the
    aggregator model's own stream when its output is the answer, else the final answer in one chunk."""
    aggregator = plan.aggregator
    assert aggregator is not None
    if aggregator.fuses_logits:  # one fused decode: its own stream is the answer's
        request = fused_request(engine, plan, query)
        experts, weights = answering(plan, (), [m.slug for m in plan.members])
        attributes = {**_generation(engine, request), tracing.EXPERTS: [m.slug for m in plan.members]}
        return await started(plan, engine.stream(request), experts, weights, span=("generate", attributes))
    if aggregator.uses_model and aggregator.streams_output:
        answers = await answer_members(engine, plan, query)
        experts, weights = answering(plan, answers, [a.slug for a in answers if a.ok])
        failed = tuple(dict.fromkeys(a.slug for a in answers if not a.ok))
        request = aggregator_request(plan, query, answers)
        attributes = {**_aggregating(plan), **_generation(engine, request)}
        chunks = _after_prompt(query, engine.stream(request)) if query.sampling.echo else engine.stream(request)
        return await started(plan, chunks, experts, weights, failed, span=("aggregate", attributes))
    done = await compose(engine, plan, query)
    return await started(plan, _one_chunk(done), done.experts, done.weights, done.failed)


async def started(
    plan: Plan,
    chunks: AsyncIterator[GenChunk],
    experts: tuple[str, ...],
    weights: tuple[float, ...],
    failed: tuple[str, ...] = (),
    *,
    span: tuple[str, Mapping[str, AttributeValue]] | None = None,
) -> AnswerStream:
    """The stream with its first chunk awaited: a failure to start (engine down, unknown adapter) is raised
    here, while the caller can still answer with an HTTP error status. With ``span`` (name, attributes), inside a
    span that lasts until the stream ends (or fails, or is closed): the engine sends its request while the span is
    current, so a vLLM server's spans join under it."""
    if span is None:
        rest = chunks.__aiter__()
        first = await rest.__anext__()
        return AnswerStream(plan, first, rest, experts, weights, failed)
    current = tracing.tracer.start_span(span[0], attributes=span[1])
    try:
        with use_span(current):  # records a failure to start on the span
            stream = await started(plan, chunks, experts, weights, failed)
    except BaseException:
        current.end()
        raise
    return dataclasses.replace(stream, rest=_spanned(current, stream.first, stream.rest))


async def _spanned(span: Span, last: GenChunk, rest: AsyncIterator[GenChunk]) -> AsyncIterator[GenChunk]:
    """``rest``, then ``span`` ended with the usage the last chunk reports. Closed early (the client left, the
    time limit), it closes ``rest`` too, which stops the generation."""
    try:
        async for chunk in rest:
            last = chunk
            yield chunk
        _usage(span, last.prompt_tokens, last.completion_tokens)
    except Exception as exc:
        tracing.record_failure(span, exc, _describe(exc))
        raise
    finally:
        span.end()
        close = getattr(rest, "aclose", None)
        if close is not None:
            await close()


async def _one_chunk(done: Answer) -> AsyncIterator[GenChunk]:
    choice = done.all_choices()[0]
    yield GenChunk(
        done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens, tool_calls=_as_deltas(choice)
    )


def _as_deltas(choice: Choice) -> tuple[dict[str, Any], ...]:
    """A whole answer's tool calls as one stream delta each (OpenAI's ``index`` added)."""
    return tuple({"index": i, **call} for i, call in enumerate(choice.tool_calls))


async def _after_prompt(query: Query, chunks: AsyncIterator[GenChunk]) -> AsyncIterator[GenChunk]:
    """An echoed prompt, then the stream (an aggregate: its members did not echo)."""
    yield GenChunk(query.prompt or "")
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
