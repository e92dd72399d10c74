"""/v1 answers in the OpenAI shape: a composition's ``Answer`` as a completion, an ``AnswerStream`` as SSE
events, and the x-moerge-* routing headers."""

from __future__ import annotations

import heapq
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

import msgspec

from api.metrics.record import note_tokens
from api.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    ErrorDetail,
    ErrorResponse,
    MemberAnswer,
    MoergeDetail,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from api.schemas import TokenTraceOut
from composition.plan import Answer, AnswerStream, Plan
from core.errors import MoergeError
from serving.engine import Choice, GenChunk

_Shape = TypeVar("_Shape", ChatLogprobs, CompletionLogprobs)
MAX_SCORES_IN_HEADER = 16  # the best candidates' scores; a composition may have thousands


def routing_headers(
    plan: Plan | None, outcome: Answer | AnswerStream | None = None, *, failed: tuple[str, ...] = ()
) -> dict[str, str]:
    """The x-moerge-* headers: the plan's routing facts; with ``outcome``, the experts the answer came from and
    the members that failed (``failed``: those named by an error that ended the request)."""
    if plan is None:
        return {"x-moerge-router": "none", "x-moerge-experts": "", "x-moerge-weights": ""}
    experts, weights = (outcome.experts, outcome.weights) if outcome is not None else (plan.experts, plan.weights)
    failed = outcome.failed if outcome is not None else failed
    headers = {
        "x-moerge-router": plan.router,
        "x-moerge-experts": ",".join(experts),
        "x-moerge-weights": ",".join(f"{w:.4g}" for w in weights),
    }
    if plan.decision is not None:
        best = heapq.nlargest(MAX_SCORES_IN_HEADER, plan.decision.scores.items(), key=lambda kv: kv[1])
        headers["x-moerge-scores"] = ",".join(f"{slug}={score:.4g}" for slug, score in best)
    if plan.fallback:
        headers["x-moerge-fallback"] = "true"
    if plan.aggregator_name:
        headers["x-moerge-aggregator"] = plan.aggregator_name
    if failed:
        headers["x-moerge-failed"] = ",".join(failed)
    return headers


class TokenSink(Protocol):
    """Where an answer's tokens (prompt + completion) are charged: the API key's usage (api/security.py)."""

    async def charge(self, tokens: int) -> None: ...

    def charge_later(self, tokens: int) -> None: ...


class CompletionRun:
    """One /v1 answer in the OpenAI shape: chat (messages) or text completion (prompt), whole or as SSE
    events; a key with limits is charged its tokens (``tokens``)."""

    def __init__(self, *, chat: bool, n: int = 1) -> None:
        self.n = n  # answers per request: a stream opens each one with its role
        self.model = ""  # the name the plan answers as, reported as `model` (set with the answer)
        self.chat = chat
        self.tokens: TokenSink | None = None  # set for a key with limits: answers are charged to it
        self.kind = ""  # the answering model's kind: the label of its token counts (api/metrics/record.py)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def complete(self, answer: Answer) -> ChatCompletion | Completion:
        self.model = answer.plan.model
        body = self.body(answer)
        if answer.plan.composite:
            # An extension field (OpenAI clients keep unknown fields): each expert's own answer, for checking
            # what the aggregate was made from.
            body.moerge = MoergeDetail(
                answers=[
                    MemberAnswer(expert=a.slug, weight=a.weight, part=a.part, text=a.text, error=a.error)
                    for a in answer.members
                ],
                aggregation=answer.aggregation.reason if answer.aggregation is not None else None,
            )
        elif answer.trace is not None:
            body.moerge = MoergeDetail(trace=TokenTraceOut.of(answer.trace))
        note_tokens(self.kind, answer.prompt_tokens, answer.completion_tokens)
        await self._charge(body)
        return body

    async def _charge(self, body: ChatCompletion | Completion) -> None:
        if self.tokens is not None:
            await self.tokens.charge(body.usage.total_tokens)

    def body(self, answer: Answer) -> ChatCompletion | Completion:
        usage = Usage.of(answer.prompt_tokens, answer.completion_tokens)
        if self.chat:
            return ChatCompletion(
                id=self.id,
                object="chat.completion",
                created=self.created,
                model=self.model,
                choices=[_chat_choice(choice) for choice in answer.all_choices()],
                usage=usage,
            )
        return Completion(
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=choice.text,
                    finish_reason=choice.finish_reason,
                    logprobs=_logprobs(choice.logprobs, CompletionLogprobs),
                )
                for choice in answer.all_choices()
            ],
            usage=usage,
        )

    def _chunk(
        self,
        piece: GenChunk | None,
        *,
        first: int | None = None,
        usage: Usage | None = None,
    ) -> ChatCompletionChunk | CompletionChunk:
        """A stream event: a piece of one answer, the opening of answer ``first`` (its role), or the usage chunk
        (``usage`` given: no choices)."""
        piece = piece if piece is not None else GenChunk("", index=first or 0)
        if self.chat:
            if first is not None:  # an answer's first chunk names the role (content "")
                delta = ChatDelta(role="assistant", content="")
            else:  # later ones carry what they have: text, tool-call deltas
                calls = [msgspec.convert(call, ToolCallDelta, strict=False) for call in piece.tool_calls]
                delta = ChatDelta(content=piece.text or None, tool_calls=calls or None)
            choice = ChatChunkChoice(
                index=piece.index,
                delta=delta,
                finish_reason=piece.finish_reason,
                logprobs=_logprobs(piece.logprobs, ChatLogprobs),
            )
            return ChatCompletionChunk(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=[] if usage else [choice],
                usage=usage,
            )
        text_choice = CompletionChoice(
            index=piece.index,
            text=piece.text,
            finish_reason=piece.finish_reason,
            logprobs=_logprobs(piece.logprobs, CompletionLogprobs),
        )
        return CompletionChunk(
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.model,
            choices=[] if usage else [text_choice],
            usage=usage,
        )

    async def sse(self, stream: AnswerStream, *, include_usage: bool) -> AsyncIterator[bytes]:
        """The answer as SSE events: chunks, the usage chunk if asked for, errors inside the stream once it
        has begun, then [DONE]."""
        self.model = stream.plan.model  # every event names what answers (a chunk is built before complete())
        usage: tuple[int, int] | None = None
        pieces = 0  # chunks with text: what a stream cut short is charged (its usage never came)
        charged = self.tokens is None
        try:
            if self.chat:
                for index in range(self.n):
                    yield _event(self._chunk(None, first=index))
            chunk: GenChunk | None = stream.first
            while chunk is not None:
                if chunk.text or chunk.finish_reason or chunk.tool_calls or chunk.logprobs:
                    yield _event(self._chunk(chunk))
                pieces += bool(chunk.text)
                if chunk.prompt_tokens is not None and chunk.completion_tokens is not None:
                    usage = (chunk.prompt_tokens, chunk.completion_tokens)
                chunk = await anext(stream.rest, None)
            if self.tokens is not None and usage is not None:
                charged = True  # before the last events: a client that saw [DONE] sees the charge too
                await self.tokens.charge(sum(usage))
            if include_usage and usage is not None:
                yield _event(self._chunk(None, usage=Usage.of(*usage)))
        except MoergeError as exc:  # the stream has begun: report the error inside it, then end it
            detail = ErrorDetail(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
            yield _event(ErrorResponse(error=detail))
        except Exception as exc:
            detail = ErrorDetail(
                message=f"stream failed: {type(exc).__name__}", type="server_error", param=None, code="stream_failed"
            )
            yield _event(ErrorResponse(error=detail))
        finally:
            await settle_stream(stream, self.kind, self.tokens, usage, pieces, charged=charged)
        yield b"data: [DONE]\n\n"


async def settle_stream(
    stream: AnswerStream,
    kind: str,
    tokens: TokenSink | None,
    usage: tuple[int, int] | None,
    pieces: int,
    *,
    charged: bool,
) -> None:
    """A stream's end, however it came: its tokens counted (cut short before its usage came, the pieces with text are
    what it counts), charged in the background if they were not yet, and its generation closed (which stops it in the
    engine when cut short). /v1's SSE and /v1/responses' events end here."""
    note_tokens(kind, *(usage if usage is not None else (0, pieces)))
    if not charged and tokens is not None:  # cut short (client gone, error)
        tokens.charge_later(sum(usage) if usage is not None else pieces)
    close = getattr(stream.rest, "aclose", None)
    if close is not None:
        await close()


def _chat_choice(choice: Choice) -> ChatChoice:
    calls = [msgspec.convert(call, ToolCall, strict=False) for call in choice.tool_calls]
    # an answer that is tool calls only has no content (null), as OpenAI's
    content = None if calls and not choice.text else choice.text
    return ChatChoice(
        index=choice.index,
        message=ChatMessage(role="assistant", content=content, tool_calls=calls or None),
        finish_reason=choice.finish_reason,
        logprobs=_logprobs(choice.logprobs, ChatLogprobs),
    )


def _logprobs(raw: dict[str, Any] | None, shape: type[_Shape]) -> _Shape | None:
    """An engine's OpenAI-shaped log-probabilities as the typed answer field (None when none were asked)."""
    return None if raw is None else msgspec.convert(raw, shape, strict=False)


def _event(payload: ChatCompletionChunk | CompletionChunk | ErrorResponse) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
