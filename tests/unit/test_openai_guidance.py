"""The checks of OpenAI's response_format, tools, tool_choice, logprobs, n and echo before anything runs: each bad
value is a ValidationFailed naming its field; good ones become the Guidance and Sampling the engines get."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from api.openai.guidance import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_TOOLS, guidance_of
from api.openai.protocol import ChatCompletionRequest, CompletionRequest
from core.errors import ValidationFailed

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def refused(call: Any) -> str:
    with pytest.raises(ValidationFailed) as exc:
        call()
    assert exc.value.param is not None
    return exc.value.param


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_a_json_schema_is_checked_and_kept() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": nested(3), "strict": True}}
    guidance = guidance_of(fmt, None, None, None)
    assert guidance is not None and guidance.structured and not guidance.calls_tools
    assert guidance.fields() == {"response_format": fmt}
    assert guidance_of({"type": "text"}, None, None, None) is None


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(MAX_SCHEMA_DEPTH)}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            "response_format.json_schema.name",
        ),
        (  # a grammar is compiled from the schema before the first token: its size is bounded
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"enum": ["x" * 99] * (MAX_SCHEMA_BYTES // 99)}},
            },
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_object", "schema": {}}, "response_format.schema"),
        ({"type": "grammar"}, "response_format.type"),
    ],
)
def test_bad_response_formats(fmt: dict[str, Any], param: str) -> None:
    assert refused(lambda: guidance_of(fmt, None, None, None)) == param


def test_tools_default_to_auto_and_name_their_choice() -> None:
    guidance = guidance_of(None, [TOOL], None, True)
    assert guidance is not None and guidance.tool_choice == "auto" and guidance.calls_tools
    named = guidance_of(None, [TOOL], {"type": "function", "function": {"name": "get_time"}}, None)
    assert named is not None and named.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    off = guidance_of(None, [TOOL], "none", None)
    assert off is not None and not off.calls_tools


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([TOOL, TOOL], None, "tools[1].function.name"),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            None,
            "tools[0].function.parameters",
        ),
        ([TOOL] * (MAX_TOOLS + 1), None, "tools"),
        ([], None, "tools"),
        ([TOOL], {"type": "function", "function": {"name": "other"}}, "tool_choice.function.name"),
        ([TOOL], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools(tools: list[Any] | None, choice: Any, param: str) -> None:
    assert refused(lambda: guidance_of(None, tools, choice, None)) == param


def test_a_format_and_tool_calls_together_are_refused() -> None:
    assert refused(lambda: guidance_of({"type": "json_object"}, [TOOL], "required", None)) == "response_format"


def test_a_tool_round_trip_keeps_calls_and_results() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    request = chat(
        messages=[
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        ]
    )
    messages = request.checked_messages()
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert messages[2] == {"role": "tool", "content": "noon", "tool_call_id": "c1"}
    bad_call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"a": 1}}}
    assert (
        refused(
            lambda: chat(messages=[{"role": "assistant", "content": None, "tool_calls": [bad_call]}]).checked_messages()
        )
        == "messages[0].tool_calls[0].function.arguments"
    )
    assert refused(lambda: chat(messages=[{"role": "tool", "content": "x"}]).checked_messages()) == (
        "messages[0].tool_call_id"
    )
    assert (
        refused(lambda: chat(messages=[{"role": "user", "content": "x", "tool_calls": [call]}]).checked_messages())
        == "messages[0].tool_calls"
    )


def test_logprobs_n_and_echo_become_the_sampling() -> None:
    sampling = chat(logprobs=True, top_logprobs=4, n=3, temperature=0.7).sampling(16)
    assert (sampling.logprobs, sampling.n, sampling.echo) == (4, 3, False)
    assert chat(logprobs=True).sampling(16).logprobs == 0  # the chosen token's only
    assert chat().sampling(16).logprobs is None
    text = msgspec.convert({"model": "m", "prompt": "p", "logprobs": 2, "echo": True}, CompletionRequest)
    assert (text.sampling(16).logprobs, text.sampling(16).echo) == (2, True)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 3}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
    ],
)
def test_bad_sampling_options(fields: dict[str, Any], param: str) -> None:
    assert refused(lambda: chat(**fields).sampling(16)) == param


def test_text_completion_logprobs_and_best_of() -> None:
    def text(**fields: Any) -> CompletionRequest:
        return msgspec.convert({"model": "m", "prompt": "p", **fields}, CompletionRequest)

    assert refused(lambda: text(logprobs=21).sampling(16)) == "logprobs"
    assert refused(lambda: text(best_of=1).checked_prompt()) == "best_of"
