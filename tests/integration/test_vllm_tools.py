"""Tool calls through moerge's /v1 on a real managed vLLM server, with the official `openai` client: a base registered
with chat template ``smollm2-tools`` (SmolLM2's ChatML with tools in the Hermes layout) and tool parser ``hermes``,
and a LoRA of it (served on the base's server, so with the base's settings). With tool_choice ``required`` or a
named function vLLM constrains the answer, so even the tiny random model's calls parse: the name is one of the
tools and the arguments validate against its parameters, streamed too (the deltas reassemble into the same call).
A round trip (the assistant's tool_calls and a tool message) renders and answers. A change of the base's settings in
the registry restarts its server with the new flags."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from registry.schemas import ExpertSpec
from tests.fixtures.live import registered, serve, vllm_settings
from tests.fixtures.tools import PARAMETERS, TIME, WEATHER
from tests.fixtures.vllm_models import build_byte_level_tiny_llama, build_vllm_tiny_lora

pytestmark = pytest.mark.vllm

ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [WEATHER, TIME]
NAMED: Any = {"type": "function", "function": {"name": "get_time"}}
# vLLM pins the call and its arguments to the tool's schema, but JSON allows whitespace anywhere between tokens, and
# greedy decoding of a random model can pick a whitespace token forever; sampled (seeded: the same answer streamed
# or not), the call closes within a few dozen tokens.
SAMPLED: dict[str, Any] = {"temperature": 1.0, "seed": 7, "max_tokens": 512}
CONTEXT = 4096  # a tiny tokenizer spells most of the tools' JSON one byte at a time: room for long prompts


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("vllm-tools")
    base = build_byte_level_tiny_llama(root / "base", context=CONTEXT)
    lora = build_vllm_tiny_lora(base, root / "lora", seed=31)
    settings = vllm_settings(root, context=CONTEXT)
    spec = ExpertSpec(slug="tiny", chat_template="smollm2-tools", tool_parser="hermes")
    key, admin = registered(settings, [(base, spec), (lora, ExpertSpec(slug="lora", base="tiny"))])
    with serve(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        yield {"url": url, "client": client, "admin": {"authorization": f"Bearer {admin}"}}


def check_call(name: str, arguments: str) -> None:
    assert name in PARAMETERS, name
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def streamed_calls(client: openai.OpenAI, **request: Any) -> list[tuple[str, str]]:
    """The tool calls of a streamed answer, reassembled from their deltas by index."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function is not None:
                    names[delta.index] = names.get(delta.index, "") + (delta.function.name or "")
                    arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
    return [(names[i], arguments.get(i, "")) for i in sorted(names)]


def server_log(live: dict[str, Any]) -> str:
    (server,) = httpx.get(f"{live['url']}/api/engines", headers=live["admin"]).json()["servers"]
    return Path(server["log"]).read_text(errors="replace")


@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_a_named_function_is_called(live: dict[str, Any], model: str) -> None:
    client: openai.OpenAI = live["client"]
    request = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, **SAMPLED)
    reply = client.chat.completions.create(**request)  # type: ignore[call-overload]
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.type == "function" and call.id and call.function.name == "get_time"
    check_call(call.function.name, call.function.arguments)
    # streamed, the arguments come as the model wrote them (a random model's whitespace too): the same JSON value
    streamed = [(n, json.loads(a)) for n, a in streamed_calls(client, **request)]
    assert streamed == [(call.function.name, json.loads(call.function.arguments))]


@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_required_calls_parse_and_validate(live: dict[str, Any], model: str) -> None:
    client: openai.OpenAI = live["client"]
    request = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", **SAMPLED)
    reply = client.chat.completions.create(**request)  # type: ignore[call-overload]
    calls = reply.choices[0].message.tool_calls or []
    assert calls, reply
    for call in calls:
        check_call(call.function.name, call.function.arguments)
    streamed = streamed_calls(client, **request)
    assert [(n, json.loads(a)) for n, a in streamed] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]


def test_the_server_runs_with_the_bases_template_and_parser(live: dict[str, Any]) -> None:
    live["client"].chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
    command = [line for line in server_log(live).splitlines() if line.startswith("=== ") and "--model" in line][-1]
    args = command.split()
    assert args[args.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in args
    assert args[args.index("--tool-strict-level") + 1] == "parameter"
    template = Path(args[args.index("--chat-template") + 1]).read_text()
    assert "<tool_call>" in template and "<tools>" in template


def test_a_tool_round_trip_answers(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, **SAMPLED)
    (call,) = first.choices[0].message.tool_calls or []
    messages: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_time", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"time": "12:00"}'},
    ]
    for model in ("tiny", "lora"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=8, temperature=0
        )
        assert raw.http_response.status_code == 200
        answer = raw.parse().choices[0]
        assert answer.finish_reason in ("stop", "length", "tool_calls")
        plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)  # no tools
        assert plain.choices[0].message.content is not None


def test_a_settings_change_restarts_the_server_with_the_new_flags(live: dict[str, Any]) -> None:
    live["client"].chat.completions.create(model="tiny", messages=ASK, max_tokens=2)  # running with hermes
    started = [line for line in server_log(live).splitlines() if line.startswith("=== ") and "--model" in line]
    # qwen3_json: vLLM's hermes parser under another name. (A parser that needs tokens the model lacks, llama3_json
    # here, stops vLLM from starting: the base then answers 503 until its parser is changed back.)
    changed = httpx.patch(
        f"{live['url']}/api/experts/tiny", json={"tool_parser": "qwen3_json"}, headers=live["admin"], timeout=30
    )
    assert changed.status_code == 200 and changed.json()["serving"]["tool_parser"] == "qwen3_json"
    client: openai.OpenAI = live["client"]
    deadline = time.monotonic() + 400
    while True:  # 503 with Retry-After while the server restarts
        try:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(min(5, float(exc.response.headers.get("retry-after", "2"))))
    commands = [line for line in server_log(live).splitlines() if line.startswith("=== ") and "--model" in line]
    assert len(commands) == len(started) + 1  # one restart
    args = commands[-1].split()
    assert args[args.index("--tool-call-parser") + 1] == "qwen3_json" and "--chat-template" in args
