"""OpenAI's options through /v1 on the vLLM path, with the official `openai` client: structured outputs (json_object,
json_schema), tool calls constrained by tool_choice (required, a named function), logprobs / top_logprobs, n > 1,
seed and echo with prompt logprobs; on experts, a k = 1 composition, token-level and weighted mixtures (one
generation each), and a composition that votes over several answers (JSON compared parsed; logprobs and n refused
saying why). The tiny random models answer anything, so what is checked is the shape: every constrained answer
parses and validates, whatever the model's weights."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from registry.schemas import ExpertSpec
from tests.fixtures.live import registered, serve, vllm_settings
from tests.fixtures.tools import TIME, WEATHER
from tests.fixtures.vllm_models import build_byte_level_tiny_llama, build_vllm_tiny_lora

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "Describe a city as JSON."}]
# Bounded in every direction, so even a random model's constrained answer ends well inside max_tokens.
CITY = {
    "type": "object",
    "properties": {
        "size": {"type": "string", "enum": ["small", "large"]},
        "rank": {"type": "integer", "minimum": 0, "maximum": 9},
        "capital": {"type": "boolean"},
    },
    "required": ["size", "rank", "capital"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
# an adapter, a k = 1 composition, a token-level and a weighted mixture
MODELS = ("lora-0", "one", "mix", "blend")
CONTEXT = 4096  # the tiny byte-level tokenizer spells the tools' JSON nearly byte by byte
# Tool calls are sampled (seeded): the hermes parser pins a call's arguments to the tool's schema, yet a random
# model decoding greedily can pick a whitespace token between JSON tokens forever.
SAMPLED: dict[str, Any] = {"temperature": 1.0, "seed": 7, "max_tokens": 512}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("v1-options")
    # a byte-level tokenizer, as SmolLM2's: vLLM's hermes tool parser must spell its markup in tokens
    base = build_byte_level_tiny_llama(root / "base", context=CONTEXT)
    loras = [build_vllm_tiny_lora(base, root / f"lora-{i}", seed=20 + i) for i in range(3)]
    settings = vllm_settings(root, context=CONTEXT)
    tools = ExpertSpec(slug="tiny", chat_template="smollm2-tools", tool_parser="hermes")
    models = [(base, tools)] + [(folder, ExpertSpec(slug=f"lora-{i}", base="tiny")) for i, folder in enumerate(loras)]
    key, admin = registered(settings, models)
    everyone = ["lora-0", "lora-1", "lora-2"]
    with serve(settings) as url:
        headers = {"authorization": f"Bearer {admin}"}
        for body in (
            {"name": "one", "router": "direct", "experts": ["lora-0"]},
            {"name": "mix", "router": "arrow", "router_params": {"top_k": 2}, "experts": everyone},
            {
                "name": "blend",
                "router": "embedding",
                "router_params": {"threshold": -1},
                "experts": everyone,
                "k": 2,
                "aggregator": "weighted",
            },
            {
                "name": "pair",
                "router": "embedding",
                "router_params": {"threshold": -1},
                "experts": everyone,
                "k": 3,
                "aggregator": "vote",
            },
            {
                "name": "writer",
                "router": "embedding",
                "router_params": {"threshold": -1},
                "experts": everyone,
                "k": 2,
                "aggregator": "synthesize",
                "aggregator_params": {"model": "tiny"},
            },
        ):
            created = httpx.post(f"{url}/api/compositions", json=body, headers=headers, timeout=120)
            assert created.status_code == 201, created.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        _wait_for_mixtures(client)
        yield {"url": url, "key": key, "client": client}


def _wait_for_mixtures(client: openai.OpenAI) -> None:
    """The mixtures registered after start make the server restart with a larger --max-lora-rank (503 meanwhile)."""
    deadline = time.monotonic() + 600
    while True:
        try:
            client.chat.completions.create(model="mix", messages=CHAT, max_tokens=1)
            return
        except openai.InternalServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.mark.parametrize("model", [*MODELS, "pair", "writer"])
def test_json_schema_answers_parse_and_validate(live: dict[str, Any], model: str) -> None:
    client: openai.OpenAI = live["client"]
    reply = client.chat.completions.create(
        model=model, messages=CHAT, response_format=JSON_SCHEMA, max_tokens=256, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice  # not cut: the constrained answer closed itself
    jsonschema.validate(json.loads(choice.message.content or ""), CITY)
    streamed = client.chat.completions.create(
        model=model, messages=CHAT, response_format=JSON_SCHEMA, max_tokens=256, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), CITY)


def test_json_object_and_a_vote_over_parsed_objects(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    obj = client.chat.completions.create(
        model="lora-1", messages=CHAT, response_format={"type": "json_object"}, max_tokens=256, temperature=0
    )
    if obj.choices[0].finish_reason == "stop":  # a random model may write an object past max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    raw = client.chat.completions.with_raw_response.create(
        model="pair", messages=CHAT, response_format=JSON_SCHEMA, max_tokens=256, temperature=0
    )
    voted = raw.parse()
    answers = voted.model_extra["moerge"]["answers"]
    parsed = [json.loads(a["text"]) for a in answers]
    for value in parsed:
        jsonschema.validate(value, CITY)
    # the kept answer is one whose parsed object won the vote, however each expert laid it out
    winner = json.loads(voted.choices[0].message.content or "")
    assert parsed.count(winner) == max(parsed.count(p) for p in parsed)
    assert raw.headers["x-moerge-aggregator"] == "vote"


@pytest.mark.parametrize("model", [*MODELS, "pair"])
def test_tool_calls_required_and_named(live: dict[str, Any], model: str) -> None:
    client: openai.OpenAI = live["client"]
    named = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        **SAMPLED,
    )
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and call.id
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
    required = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        **SAMPLED,
    )
    calls = required.choices[0].message.tool_calls or []
    assert calls, required
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for each in calls:
        jsonschema.validate(json.loads(each.function.arguments), schemas[each.function.name])
    # streamed: the deltas put the same calls back together
    pieces: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
        **SAMPLED,
    ):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            got = pieces.setdefault(delta.index, {"name": "", "arguments": ""})
            got["name"] += (delta.function.name or "") if delta.function else ""
            got["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [p["name"] for p in pieces.values()] == ["get_time"]
    assert json.loads(pieces[0]["arguments"]) == json.loads(call.function.arguments)


def test_a_tool_round_trip_is_accepted(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    reply = client.chat.completions.create(
        model="lora-0",
        messages=[
            {"role": "user", "content": "Time in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"zone": "cet"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        ],
        tools=[TIME],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content is not None and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize("model", MODELS)
def test_logprobs_and_top_logprobs(live: dict[str, Any], model: str) -> None:
    client: openai.OpenAI = live["client"]
    reply = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = (reply.choices[0].logprobs and reply.choices[0].logprobs.content) or []
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and math.isfinite(token.logprob)
        alternatives = [alt.logprob for alt in token.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert math.isclose(token.logprob, alternatives[0], abs_tol=1e-4)  # greedy: the likeliest was chosen
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    streamed = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    tokens = [
        t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert tokens == [t.token for t in content]


@pytest.mark.parametrize("model", MODELS)
def test_n_answers_with_a_seed(live: dict[str, Any], model: str) -> None:
    client: openai.OpenAI = live["client"]
    ask = {"model": model, "messages": CHAT, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7}
    first = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1  # three samples, not one answer thrice
    assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts  # seeded
    assert first.usage is not None and first.usage.completion_tokens >= 3
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**ask, stream=True):  # type: ignore[call-overload]
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_completions_echo_with_prompt_logprobs(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    prompt = "The capital of France is"
    for model in ("lora-0", "one", "mix"):
        reply = client.completions.create(
            model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2
        )
        choice = reply.choices[0]
        assert choice.text.startswith(prompt)
        logprobs = choice.logprobs
        assert logprobs is not None and logprobs.token_logprobs and logprobs.token_logprobs[0] is None
        assert len(logprobs.tokens or []) > 4  # the prompt's tokens, then the answer's
        assert "".join(logprobs.tokens or []) == choice.text
    plain = client.completions.create(model="pair", prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(prompt)  # a vote echoes the prompt once, before the kept answer


@pytest.mark.parametrize(
    ("ask", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"n": 2, "temperature": 1.0}, "n"),
        ({"tools": [TIME], "tool_choice": "required"}, "tools"),
    ],
)
def test_aggregating_compositions_refuse_what_belongs_to_one_generation(
    live: dict[str, Any], ask: dict[str, Any], param: str
) -> None:
    client: openai.OpenAI = live["client"]
    model = "writer" if param == "tools" else "pair"  # vote compares tool calls; synthesize cannot write them
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, **ask)
    assert refused.value.body["param"] == param
    assert "combines" in refused.value.body["message"] or "vote" in refused.value.body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        (
            {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [TIME, TIME]}, "tools[1].function.name"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 17}, "n"),
    ],
)
def test_bad_options_are_400s_naming_the_field(live: dict[str, Any], body: dict[str, Any], param: str) -> None:
    resp = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": "lora-0", "messages": CHAT, "max_tokens": 4, **body},
        headers={"authorization": f"Bearer {live['key']}"},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_best_of_is_refused_by_name(live: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        live["client"].completions.create(model="lora-0", prompt="x", max_tokens=2, best_of=2)
    assert refused.value.body["param"] == "best_of" and "n answers" in refused.value.body["message"]


@pytest.mark.parametrize("model", ["lora-0", "mix", "pair"])
def test_responses_api_through_vllm(live: dict[str, Any], model: str) -> None:
    """/v1/responses on the vLLM path: text.format constrains the answer (a mixture slot and a vote included)."""
    client: openai.OpenAI = live["client"]
    text_format: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    response = client.responses.create(
        model=model,
        input="Describe a city as JSON.",
        instructions="Answer in JSON.",
        text=text_format,
        max_output_tokens=256,
        temperature=0,
    )
    assert response.status == "completed", response
    jsonschema.validate(json.loads(response.output_text), CITY)
    events = list(client.responses.create(model=model, input="Hello", max_output_tokens=8, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
