"""Serving of /v1 requests: resolve the model, run the engine, shape OpenAI responses and SSE streams."""

from __future__ import annotations

import dataclasses
import heapq
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec

from api.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    ErrorDetail,
    ErrorResponse,
    MemberAnswer,
    MoergeDetail,
    Usage,
)
from api.schemas import TokenTraceOut
from composition.compose import compose, compose_stream
from composition.resolve import Resolved
from core.errors import MoergeError, ValidationFailed
from serving.dispatch import trace
from serving.engine import Engine, GenChunk, GenRequest, GenResult, Sampling, Target

MAX_SCORES_IN_HEADER = 16  # the best candidates' scores; a composition may have thousands


def routing_headers(resolved: Resolved | None) -> dict[str, str]:
    if resolved is None:
        return {"x-moerge-router": "none", "x-moerge-experts": "", "x-moerge-weights": ""}
    headers = {
        "x-moerge-router": resolved.router,
        "x-moerge-experts": ",".join(resolved.experts),
        "x-moerge-weights": ",".join(f"{w:.4g}" for w in resolved.weights),
    }
    if resolved.decision is not None:
        best = heapq.nlargest(MAX_SCORES_IN_HEADER, resolved.decision.scores.items(), key=lambda kv: kv[1])
        headers["x-moerge-scores"] = ",".join(f"{slug}={score:.4g}" for slug, score in best)
    if resolved.fallback:
        headers["x-moerge-fallback"] = "true"
    if resolved.aggregator_name:
        headers["x-moerge-aggregator"] = resolved.aggregator_name
    if resolved.failed:
        headers["x-moerge-failed"] = ",".join(resolved.failed)
    return headers


class TokenSink(Protocol):
    """Where an answer's tokens (prompt + completion) are charged: the API key's usage (api/security.py)."""

    async def charge(self, tokens: int) -> None: ...

    def charge_later(self, tokens: int) -> None: ...


class CompletionRun:
    """One /v1 request: chat (messages) or text completion (prompt), streamed or not."""

    def __init__(
        self,
        engine: Engine,
        resolved: Resolved,
        sampling: Sampling,
        *,
        query: str,
        chat: bool,
        trace: bool = False,
    ) -> None:
        self.engine = engine
        self.resolved = resolved
        self.query = query  # the text the model was resolved (routed) on; a composition's aggregator reads it
        self.sampling = sampling
        self.chat = chat
        if trace and resolved.target.mixture is None:
            raise ValidationFailed(
                f"moerge_trace shows token-level routes; {resolved.model!r} has no token-level router",
                param="moerge_trace",
            )
        self.trace = trace
        self.tokens: TokenSink | None = None  # set for a key with limits: answers are charged to it
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def request(self, *, messages: list[dict[str, Any]] | None = None, prompt: str | None = None) -> GenRequest:
        return GenRequest(
            self.resolved.target,
            self.sampling,
            messages=messages,
            prompt=prompt,
            request_id=self.id,
            router_bias=self.resolved.router_bias,
        )

    def for_target(self, request: GenRequest, target: Target) -> GenRequest:
        return dataclasses.replace(request, target=target)

    async def complete(self, request: GenRequest) -> ChatCompletion | Completion:
        if self.resolved.composite:
            done = await compose(
                self.engine, self.resolved, self.query, lambda t: self.for_target(request, t), self.sampling
            )
            text, finish = done.aggregation.text, done.finish_reason
            body = self.body(GenResult(text, finish, done.prompt_tokens, done.completion_tokens))
            # An extension field (OpenAI clients keep unknown fields): each expert's own answer, for the
            # playground and for checking what the aggregate was made from.
            body.moerge = MoergeDetail(
                answers=[
                    MemberAnswer(expert=a.slug, weight=a.weight, part=a.part, text=a.text, error=a.error)
                    for a in done.answers
                ],
                aggregation=done.aggregation.reason,
            )
            await self._charge(body)
            return body
        (result,) = await self.engine.generate([request])
        if isinstance(result, BaseException):
            raise result
        body = self.body(result)
        if self.trace:
            body.moerge = MoergeDetail(trace=TokenTraceOut.of(await trace(self.engine, request, result.text)))
        await self._charge(body)
        return body

    async def _charge(self, body: ChatCompletion | Completion) -> None:
        if self.tokens is not None:
            await self.tokens.charge(body.usage.total_tokens)

    def body(self, result: GenResult) -> ChatCompletion | Completion:
        usage = Usage.of(result.prompt_tokens, result.completion_tokens)
        if self.chat:
            message = ChatMessage(role="assistant", content=result.text)
            return ChatCompletion(
                id=self.id,
                object="chat.completion",
                created=self.created,
                model=self.resolved.model,
                choices=[ChatChoice(index=0, message=message, finish_reason=result.finish_reason)],
                usage=usage,
            )
        return Completion(
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.resolved.model,
            choices=[CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)],
            usage=usage,
        )

    def _chunk(
        self, text: str | None, finish_reason: str | None, *, first: bool = False, usage: Usage | None = None
    ) -> ChatCompletionChunk | CompletionChunk:
        """A stream event; the usage chunk (``usage`` given) has no choices."""
        if self.chat:
            # the first chunk names the role (content "" at least); later ones carry content only when there is text
            delta = ChatDelta(role="assistant", content=text or "") if first else ChatDelta(content=text or None)
            choices = [] if usage else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)]
            return ChatCompletionChunk(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.resolved.model,
                choices=choices,
                usage=usage,
            )
        return CompletionChunk(
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.resolved.model,
            choices=[] if usage else [CompletionChoice(index=0, text=text or "", finish_reason=finish_reason)],
            usage=usage,
        )

    async def open_stream(self, request: GenRequest, *, include_usage: bool) -> AsyncIterator[bytes]:
        """Start the stream and wait for its first chunk, so that a failure to start (engine down,
        unknown adapter) is still an HTTP error status rather than an error inside a 200 stream."""
        if self.resolved.composite:
            build = lambda t: self.for_target(request, t)  # noqa: E731
            chunks = (await compose_stream(self.engine, self.resolved, self.query, build, self.sampling)).__aiter__()
        else:
            chunks = self.engine.stream(request).__aiter__()
        first = await chunks.__anext__()
        return self._sse(first, chunks, include_usage=include_usage)

    async def _sse(
        self, first: GenChunk, rest: AsyncIterator[GenChunk], *, include_usage: bool
    ) -> AsyncIterator[bytes]:
        usage: tuple[int, int] | None = None
        pieces = 0  # chunks with text: what a stream cut short is charged (its usage never came)
        charged = self.tokens is None
        try:
            if self.chat:
                yield _event(self._chunk("", None, first=True))
            chunk: GenChunk | None = first
            while chunk is not None:
                if chunk.text or chunk.finish_reason:
                    yield _event(self._chunk(chunk.text, chunk.finish_reason))
                pieces += bool(chunk.text)
                if chunk.prompt_tokens is not None and chunk.completion_tokens is not None:
                    usage = (chunk.prompt_tokens, chunk.completion_tokens)
                chunk = await anext(rest, None)
            if self.tokens is not None and usage is not None:
                charged = True  # before the last events: a client that saw [DONE] sees the charge too
                await self.tokens.charge(sum(usage))
            if include_usage and usage is not None:
                yield _event(self._chunk(None, None, usage=Usage.of(*usage)))
        except MoergeError as exc:  # the stream has begun: report the error inside it, then end it
            detail = ErrorDetail(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
            yield _event(ErrorResponse(error=detail))
        except Exception as exc:
            detail = ErrorDetail(
                message=f"stream failed: {type(exc).__name__}", type="server_error", param=None, code="stream_failed"
            )
            yield _event(ErrorResponse(error=detail))
        finally:
            if not charged and self.tokens is not None:  # cut short (client gone, error): charge in the background
                self.tokens.charge_later(sum(usage) if usage is not None else pieces)
        yield b"data: [DONE]\n\n"


def _event(payload: ChatCompletionChunk | CompletionChunk | ErrorResponse) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
