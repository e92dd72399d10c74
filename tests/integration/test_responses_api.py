"""/v1/responses (OpenAI's Responses API, stateless) through a real HTTP server and the official `openai` client,
on tiny models served in process by the torch engine: the same answers as /v1/chat/completions, its stream events,
compositions, and what it refuses by name."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseErrorEvent, ResponseStreamEvent

from api.openai.responses.protocol import ResponsesRequest
from api.openai.responses.serving import ResponseRun
from composition.plan import AnswerStream, Plan
from registry.schemas import ExpertSpec
from serving.engine import GenChunk, GenerationFailed, Target
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve

STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
needs_guidance = pytest.mark.skipif(
    not TorchEngine.capabilities.guidance, reason="the torch engine decodes no JSON answers or tool calls yet"
)


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> Iterator[dict[str, Any]]:
    """A uvicorn server on a free port with a tiny base and one adapter registered."""
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora-a", base="tiny-base"))
    with serve(settings, TorchEngine()) as url:
        yield {
            "url": url,
            "env": registry_env,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key=registry_env.query_key, max_retries=0),
        }


def _chat_text(client: openai.OpenAI, model: str, messages: list[dict[str, Any]], max_tokens: int = 8) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def test_a_response_answers_as_the_chat_does(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    raw = client.responses.with_raw_response.create(
        model="lora-a", input="hello", max_output_tokens=8, temperature=0, metadata={"run": "1"}
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "lora-a"
    assert response.output_text and response.output_text == _chat_text(
        client, "lora-a", [{"role": "user", "content": "hello"}]
    )
    assert raw.headers["x-moerge-router"] == "none" and raw.headers["x-moerge-experts"] == "lora-a"
    assert raw.headers["x-moerge-engine"] == "torch"
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    # the request's settings come back; an answer cut at max_output_tokens is incomplete, and says why
    assert response.max_output_tokens == 8 and response.temperature == 0 and response.metadata == {"run": "1"}
    assert response.tools == [] and response.tool_choice == "auto" and response.error is None
    if usage.output_tokens == 8:
        assert response.status == "incomplete" and response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens" and message.status == "incomplete"
    else:
        assert response.status == "completed" and response.incomplete_details is None

    # input as items with text parts: the same conversation, the same answer
    items = client.responses.create(
        model="lora-a",
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}],
        max_output_tokens=8,
        temperature=0,
    )
    assert items.output_text == response.output_text


def test_instructions_reach_the_model(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    plain = client.responses.create(model="tiny-base", input="hello", max_output_tokens=8, temperature=0)
    told = client.responses.create(
        model="tiny-base", input="hello", instructions="Answer in French.", max_output_tokens=8, temperature=0
    )
    assert told.instructions == "Answer in French."
    assert told.usage is not None and plain.usage is not None and told.usage.input_tokens > plain.usage.input_tokens
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}]
    assert told.output_text == _chat_text(client, "tiny-base", chat)
    # a developer message and an assistant turn in input: as the chat with those messages
    items: list[Any] = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "salut", "annotations": []}]},
        {"role": "user", "content": "hello"},
    ]
    turns = client.responses.create(model="tiny-base", input=items, max_output_tokens=8, temperature=0)
    conversation = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "salut"},
        {"role": "user", "content": "hello"},
    ]
    assert turns.output_text == _chat_text(client, "tiny-base", conversation)


def test_streamed_events(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    whole = client.responses.create(model="lora-a", input="hello", max_output_tokens=10, temperature=0)
    events = list(
        client.responses.create(model="lora-a", input="hello", max_output_tokens=10, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",  # completed, or incomplete when cut at max_output_tokens (as OpenAI's)
    ]
    created, final = events[0].response, events[-1].response  # type: ignore[union-attr]
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    text = "".join(d.delta for d in deltas)  # type: ignore[union-attr]
    assert text == whole.output_text == final.output_text
    item_id = events[2].item.id  # type: ignore[union-attr]
    assert {d.item_id for d in deltas} == {item_id} and final.output[0].id == item_id  # type: ignore[union-attr]
    assert events[-3].part.text == text and events[-4].text == text  # type: ignore[union-attr]
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens and final.status == whole.status

    with httpx.stream(
        "POST",
        f"{live['url']}/v1/responses",
        headers={"authorization": f"Bearer {live['env'].query_key}"},
        json={"model": "lora-a", "input": "hello", "max_output_tokens": 4, "stream": True},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-moerge-experts"] == "lora-a" and resp.headers["x-moerge-engine"] == "torch"
        lines = [line for line in resp.iter_lines() if line]
    # every event named, its data of that type, complete by the SDK's own (strict) models
    assert lines[0] == "event: response.created" and lines[-2].startswith("event: response.")
    for name, data in zip(lines[::2], lines[1::2], strict=True):
        event = STREAM_EVENT.validate_json(data.removeprefix("data: "), strict=True)
        assert event.type == name.removeprefix("event: ")


def test_the_answer_is_complete_by_the_sdk_models(live: dict[str, Any]) -> None:
    """Every field the SDK's `Response` requires is sent (its client does not validate: a missing one would only
    show when read)."""
    resp = httpx.post(
        f"{live['url']}/v1/responses",
        headers={"authorization": f"Bearer {live['env'].query_key}"},
        json={"model": "lora-a", "input": "hello", "max_output_tokens": 4, "instructions": "Be brief."},
    )
    assert resp.status_code == 200, resp.text
    response = Response.model_validate_json(resp.text, strict=True)
    assert response.output_text and response.instructions == "Be brief."
    # and documented so
    spec = httpx.get(f"{live['url']}/api/schema/openapi.json").json()
    answer = spec["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    component = spec["components"]["schemas"][answer["$ref"].rsplit("/", 1)[1]]
    assert {"id", "object", "created_at", "status", "output", "usage", "tools", "tool_choice"} <= set(
        component["properties"]
    )


async def test_an_error_after_the_stream_began_is_an_error_event() -> None:
    async def rest() -> AsyncIterator[GenChunk]:
        yield GenChunk(" more")
        raise GenerationFailed("the server went away", param="model")

    run = ResponseRun(ResponsesRequest(model="m", input="hello", stream=True))
    plan = Plan("m", Target(base_id="b", base_dir=Path()))
    stream = AnswerStream(plan, GenChunk("some"), rest(), experts=("m",), weights=(1.0,))
    events = [STREAM_EVENT.validate_json(chunk.split(b"data: ", 1)[1]) async for chunk in run.sse(stream)]
    assert [e.type for e in events][-3:] == ["response.output_text.delta", "response.output_text.delta", "error"]
    error = events[-1]
    assert isinstance(error, ResponseErrorEvent) and error.message == "the server went away"
    assert error.code == "generation_failed" and error.param == "model" and error.sequence_number == len(events) - 1


def test_a_composition_answers(live: dict[str, Any]) -> None:
    admin = {"authorization": f"Bearer {live['env'].admin_key}"}
    resp = httpx.post(
        f"{live['url']}/api/compositions",
        headers=admin,
        json={"name": "dates", "router": "direct", "experts": ["lora-a"]},
    )
    assert resp.status_code == 201, resp.text
    client: openai.OpenAI = live["client"]
    raw = client.responses.with_raw_response.create(model="dates", input="hello", max_output_tokens=6, temperature=0)
    direct = client.responses.create(model="lora-a", input="hello", max_output_tokens=6, temperature=0)
    assert raw.parse().model == "dates" and raw.parse().output_text == direct.output_text
    assert raw.headers["x-moerge-router"] == "direct" and raw.headers["x-moerge-experts"] == "lora-a"
    with client.responses.with_streaming_response.create(
        model="dates", input="hello", max_output_tokens=6, temperature=0, stream=True
    ) as streamed:
        assert streamed.headers["x-moerge-router"] == "direct"
        last = list(streamed.parse())[-1]
    assert last.response.output_text == direct.output_text  # type: ignore[union-attr]


def _refused(call: Any, param: str) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    body: dict[str, Any] = refused.value.body  # type: ignore[assignment]
    assert body["param"] == param, body
    return body


def test_refusals_name_the_field(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]

    def ask(**fields: Any) -> Any:
        body: dict[str, Any] = {"model": "tiny-base", "input": "hello", "max_output_tokens": 4}
        return lambda: client.responses.create(**{**body, **fields})

    stored = _refused(ask(previous_response_id="resp_123"), "previous_response_id")
    assert "not stored" in stored["message"]
    assert "not stored" in _refused(ask(store=True), "store")["message"]
    client.responses.create(model="tiny-base", input="hello", max_output_tokens=2, store=False)  # the neutral value
    assert "web_search" in _refused(ask(tools=[{"type": "web_search"}]), "tools[0].type")["message"]
    _refused(ask(tool_choice={"type": "file_search"}), "tool_choice.type")
    _refused(ask(background=True), "background")
    _refused(ask(conversation="conv_1"), "conversation")
    _refused(ask(include=["message.output_text.logprobs"]), "include")
    _refused(ask(reasoning={"effort": "high"}), "reasoning")
    _refused(ask(truncation="auto"), "truncation")
    _refused(ask(extra_body={"colour": "red"}), "colour")
    _refused(ask(max_output_tokens=0), "max_output_tokens")
    _refused(ask(temperature=3), "temperature")
    # bad input items, each named where it is
    _refused(ask(input=[]), "input")
    _refused(ask(input=[{"role": "robot", "content": "x"}]), "input[0].role")
    _refused(ask(input=[{"role": "user", "content": "a"}, {"type": "reasoning", "summary": []}]), "input[1].type")
    _refused(
        ask(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
        "input[0].content[0].type",
    )
    _refused(ask(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0].type")
    _refused(ask(input=[{"role": "user", "content": "a", "colour": "red"}]), "input[0].colour")
    _refused(ask(input=[{"type": "function_call_output", "output": "4"}]), "input[0].call_id")
    _refused(ask(input=["hello"]), "input[0]")
    # text.format and tools, checked as the chat checks them, named as this API names them
    _refused(ask(text={"format": {"type": "yaml"}}), "text.format.type")
    _refused(ask(text={"format": {"type": "json_schema", "schema": {"type": "object"}}}), "text.format.name")
    bad_schema = {"type": "json_schema", "name": "x", "schema": {"type": "nothing"}}
    _refused(ask(text={"format": bad_schema}), "text.format.schema")
    add = {"type": "function", "name": "add", "parameters": {"type": "object"}, "strict": True}
    _refused(ask(tools=[{**add, "name": "two words"}]), "tools[0].name")
    _refused(ask(tools=[add], tool_choice={"type": "function", "name": "sub"}), "tool_choice.name")


def test_a_tool_round_trip_is_a_conversation(live: dict[str, Any]) -> None:
    """A call the model made and its output, handed back as input items: the chat's assistant tool call and tool
    message."""
    client: openai.OpenAI = live["client"]
    items: list[Any] = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Let me add."},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a": 2, "b": 2}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "4"},
    ]
    answer = client.responses.create(model="tiny-base", input=items, max_output_tokens=6, temperature=0)
    chat: list[dict[str, Any]] = [
        {"role": "user", "content": "What is 2 + 2?"},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    assert answer.output_text == _chat_text(client, "tiny-base", chat, max_tokens=6)


@needs_guidance
def test_text_format_json_schema(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": [3, 4, 5]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    form: Any = {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}
    response = client.responses.create(
        model="tiny-base",
        input="2 + 2?",
        text={"format": form},
        max_output_tokens=32,
        temperature=0,  # type: ignore[typeddict-item]
    )
    assert response.text is not None and response.text.format is not None and response.text.format.type == "json_schema"
    assert response.status == "completed" and set(json.loads(response.output_text)) == {"answer"}
    chat = client.chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "2 + 2?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": schema, "strict": True}},
        max_tokens=32,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content


@needs_guidance
def test_a_named_function_is_called(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    add = {
        "type": "function",
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"enum": [1, 2, 3]}, "b": {"enum": [1, 2, 3]}},  # short: the tiny model rambles
            "required": ["a", "b"],
            "additionalProperties": False,
        },
        "strict": True,
    }
    ask: dict[str, Any] = {
        "model": "tiny-base",
        "input": "What is 2 + 2?",
        "tools": [add],
        "tool_choice": {"type": "function", "name": "add"},
        "max_output_tokens": 48,
        "temperature": 0,
    }
    response = client.responses.create(**ask)
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.tool_choice.type == "function" and response.tools[0].name == "add"  # type: ignore[union-attr]
    assert response.status == "completed", response
    assert len(calls) == 1 and calls[0].name == "add" and set(json.loads(calls[0].arguments)) == {"a", "b"}
    assert calls[0].call_id and calls[0].id.startswith("fc_") and response.output_text == ""

    # streamed: the call's arguments in deltas, then done, then the response with the same call
    events = list(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    streamed_calls = [item for item in final.output if item.type == "function_call"]
    assert pieces == streamed_calls[0].arguments == calls[0].arguments

    # the call and its output handed back: the model answers on
    follow = client.responses.create(
        model="tiny-base",
        input=[
            {"role": "user", "content": "What is 2 + 2?"},
            # (text before the call: the tiny models' chat template cannot render an assistant turn without content)
            {"role": "assistant", "content": "Adding."},
            *[c.model_dump(exclude_none=True) for c in calls],
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "4"},
        ],
        max_output_tokens=6,
        temperature=0,
    )
    assert follow.output and follow.output[0].type == "message"
