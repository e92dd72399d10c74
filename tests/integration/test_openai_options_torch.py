"""OpenAI's options end to end on the torch engine: the official `openai` client against a real HTTP server, tiny
models served in process. JSON answers under a schema, log-probabilities typed in the client's objects, several
answers, and a text completion that echoes its prompt with its log-probabilities."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_lora

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
        "rank": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}
CHAT: Any = [{"role": "user", "content": "What is the capital of France?"}]
JSON_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}}
TOOL: Any = {"type": "function", "function": {"name": "capital_of", "parameters": SCHEMA}}
NAMED: Any = {"type": "function", "function": {"name": "capital_of"}}


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path, tmp_path: Path) -> Iterator[openai.OpenAI]:
    """A uvicorn server on a free port with a tiny base and an adapter of it, on the torch engine."""
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora-a", base="tiny-base"))
    register(
        settings, build_tiny_lora(tiny_base, tmp_path / "lora-b", seed=7), ExpertSpec(slug="lora-b", base="tiny-base")
    )
    with serve(settings, TorchEngine()) as url:
        pair = {
            "name": "pair",
            "router": "embedding",
            "router_params": {"threshold": -1.0},
            "k": 2,
            "experts": ["lora-a", "lora-b"],
            "aggregator": "vote",
        }
        created = httpx.post(f"{url}/api/compositions", json=pair, headers=registry_env.admin, timeout=60)
        assert created.status_code == 201, created.text
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=registry_env.query_key, max_retries=0)


def test_chat_json_schema_logprobs_and_n(live: openai.OpenAI) -> None:
    reply = live.chat.completions.create(
        model="lora-a",
        messages=CHAT,
        max_tokens=64,
        temperature=1.0,
        seed=7,
        n=2,
        logprobs=True,
        top_logprobs=3,
        response_format=JSON_FORMAT,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        assert choice.message.content is not None
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content:
            assert isinstance(entry.token, str) and entry.logprob <= 0
            assert entry.bytes == list(entry.token.encode())
            assert len(entry.top_logprobs) == 3
            values = [t.logprob for t in entry.top_logprobs]
            assert values == sorted(values, reverse=True)
    assert reply.usage is not None and reply.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in reply.choices if c.logprobs and c.logprobs.content
    )


def test_named_tool_call_through_the_client(live: openai.OpenAI) -> None:
    reply = live.chat.completions.create(
        model="tiny-base", messages=CHAT, max_tokens=64, tools=[TOOL], tool_choice=NAMED
    )
    message = reply.choices[0].message
    assert message.content is None and message.tool_calls
    (call,) = message.tool_calls
    assert call.function.name == "capital_of" and call.id.startswith("call_")  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)  # type: ignore[union-attr]


def test_completion_echo_with_logprobs(live: openai.OpenAI) -> None:
    prompt = "Solve 12 + 30"
    reply = live.completions.create(
        model="tiny-base", prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2
    )
    plain = live.completions.create(model="tiny-base", prompt=prompt, max_tokens=6, temperature=0)
    (choice,) = reply.choices
    assert choice.text == prompt + plain.choices[0].text
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    prompt_tokens = reply.usage.prompt_tokens if reply.usage else 0
    assert len(lp.tokens) == prompt_tokens + (reply.usage.completion_tokens if reply.usage else 0)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(top is not None and 2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_streamed_n_with_logprobs(live: openai.OpenAI) -> None:
    texts: dict[int, str] = {0: "", 1: ""}
    tokens = 0
    finishes: dict[int, str] = {}
    usage = None
    for chunk in live.completions.create(
        model="lora-a",
        prompt="hello",
        max_tokens=8,
        temperature=1.0,
        seed=3,
        n=2,
        logprobs=1,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens += len(choice.logprobs.tokens or []) if choice.logprobs else 0
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    whole = live.completions.create(model="lora-a", prompt="hello", max_tokens=8, temperature=1.0, seed=3, n=2)
    assert texts == {c.index: c.text for c in whole.choices}
    assert set(finishes) == {0, 1}
    assert usage is not None and usage.completion_tokens == tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_messages_the_chat_template_cannot_render_are_a_400(live: openai.OpenAI) -> None:
    """The tiny models' template adds each message's content to a string: an assistant turn of tool calls only
    (content null) breaks it. That is the caller's conversation against this base's template (a 400 naming
    `messages`), not an engine failure (it was a 502)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    for model in ("lora-a", "pair"):  # a vote whose every member is refused so is refused itself (it was a 502)
        with pytest.raises(openai.BadRequestError) as refused:
            live.chat.completions.create(
                model=model,
                messages=[
                    {"role": "user", "content": "time?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},  # type: ignore[list-item]
                    {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
                ],
                max_tokens=4,
            )
        assert refused.value.body["param"] == "messages" and "chat template" in refused.value.body["message"]
