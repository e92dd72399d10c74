"""/v1/responses answers: a composition's ``Answer`` as a ``Response``, an ``AnswerStream`` as the Responses API's
stream events (SSE with ``event:`` names); a key with limits is charged the answer's tokens."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from api.metrics.record import note_tokens
from api.openai.protocol import MemberAnswer, MoergeDetail
from api.openai.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    FunctionCallItem,
    IncompleteDetails,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Response,
    ResponseEvent,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from api.openai.serving import TokenSink, settle_stream
from composition.plan import Answer, AnswerStream
from core.errors import MoergeError
from serving.engine import GenChunk

LENGTH = "length"  # the finish reason of an answer cut at max_output_tokens


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message(text: str, status: str) -> OutputMessage:
    return OutputMessage(id=_id("msg"), status=status, content=[OutputText(text=text)])


def output_items(text: str, tool_calls: tuple[dict[str, Any], ...], finish_reason: str) -> list[OutputItem]:
    """An answer's output: its text as a message (unless it is tool calls only), then each call."""
    items: list[OutputItem] = []
    if text or not tool_calls:
        items.append(_message(text, "completed"))
    for call in tool_calls:
        function = call.get("function") or {}
        items.append(
            FunctionCallItem(
                id=_id("fc"),
                call_id=str(call.get("id") or _id("call")),
                name=str(function.get("name") or ""),
                arguments=str(function.get("arguments") or ""),
                status="completed",
            )
        )
    if finish_reason == LENGTH:  # the item the answer was cut in
        items[-1].status = "incomplete"
    return items


class ResponseRun:
    """One /v1/responses answer, whole or as stream events."""

    def __init__(self, request: ResponsesRequest) -> None:
        self.request = request
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.model = request.model  # the name the plan answers as (set with the answer)
        self.tokens: TokenSink | None = None  # set for a key with limits: answers are charged to it
        self.kind = ""  # the answering model's kind: the label of its token counts (api/metrics/record.py)
        self.sequence = 0

    def response(self, output: list[OutputItem], usage: ResponseUsage | None, finish_reason: str | None) -> Response:
        """The Response object: in progress (``finish_reason`` None), completed, or incomplete (cut at
        max_output_tokens)."""
        status = "in_progress" if finish_reason is None else "incomplete" if finish_reason == LENGTH else "completed"
        request = self.request
        return Response(
            id=self.id,
            object="response",
            created_at=self.created_at,
            status=status,
            completed_at=int(time.time()) if status == "completed" else None,
            error=None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            model=self.model,
            output=output,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=None,
            reasoning=None,
            store=False,
            background=False,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            text=request.echo_text(),
            tool_choice=request.echo_tool_choice(),
            tools=request.echo_tools(),
            truncation="disabled",
            usage=usage,
            user=request.user,
            metadata=request.metadata or {},
        )

    async def complete(self, answer: Answer) -> Response:
        self.model = answer.plan.model
        choice = answer.all_choices()[0]  # a response is one answer (the API has no n)
        usage = ResponseUsage.of(answer.prompt_tokens, answer.completion_tokens)
        body = self.response(
            output_items(choice.text, choice.tool_calls, choice.finish_reason), usage, choice.finish_reason
        )
        if answer.plan.composite:  # as on /v1/chat/completions: each expert's own answer
            body.moerge = MoergeDetail(
                answers=[
                    MemberAnswer(expert=a.slug, weight=a.weight, part=a.part, text=a.text, error=a.error)
                    for a in answer.members
                ],
                aggregation=answer.aggregation.reason if answer.aggregation is not None else None,
            )
        note_tokens(self.kind, answer.prompt_tokens, answer.completion_tokens)
        if self.tokens is not None:
            await self.tokens.charge(usage.total_tokens)
        return body

    def _event(self, event: StreamEvent) -> bytes:
        kind = event.type
        return f"event: {kind}\n".encode() + b"data: " + msgspec.json.encode(event) + b"\n\n"

    def _next(self) -> int:
        number = self.sequence
        self.sequence += 1
        return number

    async def sse(self, stream: AnswerStream) -> AsyncIterator[bytes]:
        """The answer as the Responses API's events: created, in progress, each output item (added, its deltas,
        done), then completed (or incomplete: cut at max_output_tokens) with the whole response; an error once the
        stream has begun is an ``error`` event that ends it."""
        self.model = stream.plan.model
        usage: tuple[int, int] | None = None
        pieces = 0  # chunks with text: what a stream cut short is charged (its usage never came)
        charged = self.tokens is None
        items = _Items(self._next)
        try:
            yield self._event(
                ResponseEvent(
                    type="response.created", sequence_number=self._next(), response=self.response([], None, None)
                )
            )
            yield self._event(
                ResponseEvent(
                    type="response.in_progress", sequence_number=self._next(), response=self.response([], None, None)
                )
            )
            finish_reason = "stop"
            chunk: GenChunk | None = stream.first
            while chunk is not None:
                if chunk.index == 0:  # one answer (the API has no n)
                    for event in items.feed(chunk):
                        yield self._event(event)
                    finish_reason = chunk.finish_reason or finish_reason
                pieces += bool(chunk.text)
                if chunk.prompt_tokens is not None and chunk.completion_tokens is not None:
                    usage = (chunk.prompt_tokens, chunk.completion_tokens)
                chunk = await anext(stream.rest, None)
            for event in items.finish(finish_reason):
                yield self._event(event)
            if self.tokens is not None and usage is not None:
                charged = True  # before the last event: a client that saw it sees the charge too
                await self.tokens.charge(sum(usage))
            body = self.response(items.output, ResponseUsage.of(*usage) if usage else None, finish_reason)
            yield self._event(
                ResponseEvent(type=f"response.{body.status}", sequence_number=self._next(), response=body)
            )
        except MoergeError as exc:  # the stream has begun: report the error inside it, then end it
            yield self._event(
                ErrorEvent(
                    type="error", sequence_number=self._next(), code=exc.code, message=exc.message, param=exc.param
                )
            )
        except Exception as exc:
            yield self._event(
                ErrorEvent(
                    type="error",
                    sequence_number=self._next(),
                    code="stream_failed",
                    message=f"stream failed: {type(exc).__name__}",
                    param=None,
                )
            )
        finally:
            await settle_stream(stream, self.kind, self.tokens, usage, pieces, charged=charged)


class _Items:
    """The output items of a streamed answer as its chunks come: text opens a message, a tool-call delta with a new
    index opens a function call; an item is done when the next one opens, or at the end."""

    def __init__(self, number: Callable[[], int]) -> None:
        self.number = number  # the next sequence number
        self.output: list[OutputItem] = []
        self.open: OutputItem | None = None
        self.calls: dict[int, FunctionCallItem] = {}  # by the tool-call delta's index

    def _added(self, item: OutputItem) -> list[StreamEvent]:
        self.output.append(item)
        self.open = item
        index = len(self.output) - 1
        # the item as it is added: no text or arguments yet (copies: the item itself fills in as deltas come)
        shown = (
            msgspec.structs.replace(item, content=[])
            if isinstance(item, OutputMessage)
            else msgspec.structs.replace(item)
        )
        events: list[StreamEvent] = [
            OutputItemEvent(
                type="response.output_item.added", sequence_number=self.number(), output_index=index, item=shown
            )
        ]
        if isinstance(item, OutputMessage):
            events.append(
                ContentPartEvent(
                    type="response.content_part.added",
                    sequence_number=self.number(),
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=OutputText(text=""),
                )
            )
        return events

    def _close(self, status: str) -> list[StreamEvent]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        item.status = status
        events: list[StreamEvent] = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events.append(
                TextDoneEvent(
                    type="response.output_text.done",
                    sequence_number=self.number(),
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=part.text,
                )
            )
            events.append(
                ContentPartEvent(
                    type="response.content_part.done",
                    sequence_number=self.number(),
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        else:
            events.append(
                ArgumentsDoneEvent(
                    type="response.function_call_arguments.done",
                    sequence_number=self.number(),
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        events.append(
            OutputItemEvent(
                type="response.output_item.done", sequence_number=self.number(), output_index=index, item=item
            )
        )
        return events

    def feed(self, chunk: GenChunk) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if chunk.text:
            if not isinstance(self.open, OutputMessage):
                events += self._close("completed")
                events += self._added(_message("", "in_progress"))
            message = self.open
            assert isinstance(message, OutputMessage)
            message.content[0].text += chunk.text
            events.append(
                TextDeltaEvent(
                    type="response.output_text.delta",
                    sequence_number=self.number(),
                    item_id=message.id,
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=chunk.text,
                )
            )
        for delta in chunk.tool_calls:
            events += self._call(delta)
        return events

    def _call(self, delta: dict[str, Any]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        function = delta.get("function") or {}
        index = int(delta.get("index") or 0)
        call = self.calls.get(index)
        if call is None:  # a new call: the one before it is done
            events += self._close("completed")
            call = FunctionCallItem(
                id=_id("fc"),
                call_id=str(delta.get("id") or _id("call")),
                name=str(function.get("name") or ""),
                arguments="",
                status="in_progress",
            )
            self.calls[index] = call
            events += self._added(call)
        elif function.get("name") and not call.name:
            call.name = str(function["name"])
        arguments = function.get("arguments")
        if arguments:
            call.arguments += str(arguments)
            if call is self.open:  # a late piece of a call already done only reaches the final response
                events.append(
                    ArgumentsDeltaEvent(
                        type="response.function_call_arguments.delta",
                        sequence_number=self.number(),
                        item_id=call.id,
                        output_index=self.output.index(call),
                        delta=str(arguments),
                    )
                )
        return events

    def finish(self, finish_reason: str) -> list[StreamEvent]:
        """The end of the stream: an answer with no output at all is an empty message; the open item is done."""
        events: list[StreamEvent] = []
        if not self.output:
            events += self._added(_message("", "in_progress"))
        return events + self._close("incomplete" if finish_reason == LENGTH else "completed")
