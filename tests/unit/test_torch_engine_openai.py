"""OpenAI's options on the torch engine, on the tiny seeded models: log-probabilities (checked against the model
run independently), several answers (n) with derived seeds, echo, JSON answers and tool calls decoded under
xgrammar, the same through streams and token-level mixtures, and what a fused request refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ValidationFailed
from routers.token import TOKEN_ROUTERS
from serving.engine import (
    Choice,
    FusedMember,
    Fusion,
    GenChunk,
    GenRequest,
    GenResult,
    Guidance,
    Sampling,
    Target,
    TokenMixture,
)
from serving.torch_engine import TorchEngine
from tests.fixtures.tiny import CHAT_TEMPLATE, build_tiny_lora

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "Solve 12 + 30"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "size", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Berlin"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = (
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
)
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}


def json_format(schema: dict[str, Any]) -> Guidance:
    return Guidance(response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})


@pytest.fixture
async def engine() -> Any:
    eng = TorchEngine()
    yield eng
    await eng.close()


@pytest.fixture(scope="module")
def mixed_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openai-mix")
    return build_tiny_lora(tiny_base, root / "e0", r=4, alpha=64, target_modules=("q_proj", "v_proj"), seed=40)


def base(tiny_base: Path, adapter: Path | None = None) -> Target:
    if adapter is None:
        return Target(base_id="b", base_dir=tiny_base)
    return Target(base_id="b", base_dir=tiny_base, adapter_id=adapter.name, adapter_dir=adapter)


def ok(result: GenResult | BaseException) -> GenResult:
    assert isinstance(result, GenResult), result
    return result


async def one(engine: TorchEngine, request: GenRequest) -> GenResult:
    return ok((await engine.generate([request]))[0])


def logprobs_of(choice: Choice) -> dict[str, Any]:
    assert choice.logprobs is not None
    return choice.logprobs


async def refused(engine: TorchEngine, request: GenRequest) -> ValidationFailed:
    (out,) = await engine.generate([request])
    assert isinstance(out, ValidationFailed), out
    return out


async def chunks(engine: TorchEngine, request: GenRequest) -> list[GenChunk]:
    return [chunk async for chunk in engine.stream(request)]


def spelled(tok: Any, token: int) -> str:
    """A token decoded alone, with the leading space SentencePiece's decoder drops (vLLM's token strings)."""
    text = str(tok.decode([token]))
    marked = str(tok.convert_ids_to_tokens(token)).startswith("\u2581") and not text.startswith(" ")
    return " " + text if marked else text


def model_of(tiny_base: Path, adapter: Path | None = None) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model


def reference(tiny_base: Path, prompt_ids: list[int], max_new: int, adapter: Path | None = None) -> tuple[Any, Any]:
    """Plain greedy generate, then one forward pass over prompt + answer: (new token ids, log_softmax of the
    logits that chose each of them)."""
    model = model_of(tiny_base, adapter)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
        )
        new = out[0, len(prompt_ids) :]
        logits = model(input_ids=out).logits[0, len(prompt_ids) - 1 : -1]
    return new.tolist(), torch.log_softmax(logits.float(), dim=-1)


# --- log-probabilities ------------------------------------------------------------------------------------


async def test_completion_logprobs_equal_the_models_own(engine: TorchEngine, tiny_base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    request = GenRequest(base(tiny_base), Sampling(max_tokens=12, logprobs=3), prompt=PROMPT)
    result = await one(engine, request)
    plain = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=12), prompt=PROMPT))
    assert result.text == plain.text  # recording does not change the answer
    (choice,) = result.choices
    lp = choice.logprobs
    assert lp is not None and set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    new, logprobs = reference(tiny_base, tok(PROMPT)["input_ids"], 12)
    assert len(lp["tokens"]) == len(new) == result.completion_tokens
    assert lp["tokens"] == [spelled(tok, t) for t in new]
    expected = [float(logprobs[i, t]) for i, t in enumerate(new)]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert math.isfinite(value) and value <= 0
        assert 3 <= len(top) <= 4  # the 3 likeliest, and the chosen one
        assert value == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the likeliest
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(new))]


async def test_chat_logprobs_shape_and_values(engine: TorchEngine, tiny_base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    result = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=10, logprobs=5), messages=CHAT))
    content = result.all_choices()[0].logprobs["content"]  # type: ignore[index]
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    new, logprobs = reference(tiny_base, tok(text, add_special_tokens=False)["input_ids"], 10)
    assert len(content) == len(new)
    for i, (entry, token) in enumerate(zip(content, new, strict=True)):
        assert entry["token"] == spelled(tok, token)
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(float(logprobs[i, token]), abs=1e-4)
        top = entry["top_logprobs"]
        values = [t["logprob"] for t in top]
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert all(math.isfinite(v) and v <= 0 for v in values)
        assert values == pytest.approx(logprobs[i].topk(5).values.tolist(), abs=1e-4)
        assert entry["logprob"] == pytest.approx(values[0], abs=1e-6)  # greedy


async def test_sampled_logprobs_are_the_raw_distributions(engine: TorchEngine, tiny_base: Path) -> None:
    """vLLM's default (raw_logprobs): the model's log_softmax before temperature, whatever token was drawn."""
    sampling = Sampling(max_tokens=10, temperature=1.7, seed=3, logprobs=2)
    result = await one(engine, GenRequest(base(tiny_base), sampling, prompt=PROMPT))
    lp = result.all_choices()[0].logprobs
    assert lp is not None
    assert all(math.isfinite(v) and v <= 0 for v in lp["token_logprobs"])
    tok = AutoTokenizer.from_pretrained(tiny_base)
    with torch.inference_mode():
        logits = model_of(tiny_base)(input_ids=torch.tensor([tok(PROMPT)["input_ids"]])).logits[0, -1].float()
    raw = torch.log_softmax(logits, -1)
    first = lp["top_logprobs"][0]
    top = raw.topk(2)
    assert {spelled(tok, int(i)): float(v) for i, v in zip(top.indices, top.values, strict=True)}.items() <= {
        k: pytest.approx(v, abs=1e-4) for k, v in first.items()
    }.items()
    chosen = [i for i in range(len(raw)) if spelled(tok, i) == lp["tokens"][0]]
    assert any(abs(lp["token_logprobs"][0] - float(raw[i])) < 1e-4 for i in chosen)
    tempered = torch.log_softmax(logits / 1.7, -1)
    assert not any(abs(lp["token_logprobs"][0] - float(tempered[i])) < 1e-4 for i in chosen)


# --- n answers ------------------------------------------------------------------------------------------


async def test_n_answers_with_derived_seeds(engine: TorchEngine, tiny_base: Path) -> None:
    sampling = Sampling(max_tokens=12, temperature=1.0, seed=11, n=3, logprobs=0)
    request = GenRequest(base(tiny_base), sampling, prompt=PROMPT)
    first, again = await one(engine, request), await one(engine, request)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) == 3  # each answer its own seed
    assert first.text == first.choices[0].text and first.finish_reason == first.choices[0].finish_reason
    assert first.completion_tokens == sum(len(logprobs_of(c)["tokens"]) for c in first.choices)
    alone = await one(
        engine, GenRequest(base(tiny_base), Sampling(max_tokens=12, temperature=1.0, seed=12), prompt=PROMPT)
    )
    assert alone.text == first.choices[1].text  # answer i is seeded seed + i, as vLLM's
    unseeded = await one(
        engine, GenRequest(base(tiny_base), Sampling(max_tokens=12, temperature=1.0, n=2), prompt=PROMPT)
    )
    assert len(unseeded.choices) == 2


async def test_n_answers_stream_by_index(engine: TorchEngine, tiny_base: Path) -> None:
    sampling = Sampling(max_tokens=10, temperature=1.0, seed=5, n=3)
    whole = await one(engine, GenRequest(base(tiny_base), sampling, messages=CHAT))
    pieces = await chunks(engine, GenRequest(base(tiny_base), sampling, messages=CHAT))
    last = pieces[-1]
    assert last.index == 0 and last.finish_reason == whole.finish_reason
    assert (last.prompt_tokens, last.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)
    assert all(p.finish_reason is None for p in pieces[:-1] if p.index == 0)
    for choice in whole.choices:
        mine = [p for p in pieces if p.index == choice.index]
        assert "".join(p.text for p in mine) == choice.text
        if choice.index:
            assert [p.finish_reason for p in mine if p.finish_reason] == [choice.finish_reason]


# --- echo -----------------------------------------------------------------------------------------------


async def test_echo_with_prompt_logprobs(engine: TorchEngine, tiny_base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompt_ids = tok(PROMPT)["input_ids"]
    result = await one(
        engine, GenRequest(base(tiny_base), Sampling(max_tokens=6, logprobs=2, echo=True), prompt=PROMPT)
    )
    plain = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=6), prompt=PROMPT))
    assert result.text == PROMPT + plain.text
    lp = result.all_choices()[0].logprobs
    assert lp is not None
    assert len(lp["tokens"]) == len(prompt_ids) + result.completion_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    model = model_of(tiny_base)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0].float(), -1)
    expected = [float(logprobs[i, t]) for i, t in enumerate(prompt_ids[1:])]
    assert lp["token_logprobs"][1 : len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    no_logprobs = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=6, echo=True), prompt=PROMPT))
    assert no_logprobs.text == result.text
    chat = await refused(engine, GenRequest(base(tiny_base), Sampling(max_tokens=6, echo=True), messages=CHAT))
    assert chat.param == "echo"


async def test_echo_streams_the_prompt_first(engine: TorchEngine, tiny_base: Path) -> None:
    sampling = Sampling(max_tokens=6, logprobs=1, echo=True, n=2, temperature=1.0, seed=1)
    whole = await one(engine, GenRequest(base(tiny_base), sampling, prompt=PROMPT))
    pieces = await chunks(engine, GenRequest(base(tiny_base), sampling, prompt=PROMPT))
    for choice in whole.choices:
        mine = [p for p in pieces if p.index == choice.index]
        assert mine[0].text == PROMPT and mine[0].logprobs is not None
        assert mine[0].logprobs["token_logprobs"][0] is None
        assert "".join(p.text for p in mine) == choice.text
        streamed = [t for p in mine if p.logprobs for t in p.logprobs["tokens"]]
        offsets = [o for p in mine if p.logprobs for o in p.logprobs["text_offset"]]
        assert choice.logprobs is not None
        assert streamed == choice.logprobs["tokens"] and offsets == choice.logprobs["text_offset"]


# --- streams --------------------------------------------------------------------------------------------


async def test_greedy_stream_equals_whole_answer_with_logprobs(engine: TorchEngine, tiny_base: Path) -> None:
    sampling = Sampling(max_tokens=16, logprobs=2)
    for request in (
        GenRequest(base(tiny_base), sampling, messages=CHAT),
        GenRequest(base(tiny_base), sampling, prompt=PROMPT),
    ):
        whole = await one(engine, request)
        pieces = await chunks(engine, request)
        assert "".join(p.text for p in pieces) == whole.text
        assert pieces[-1].finish_reason == whole.finish_reason
        assert pieces[-1].completion_tokens == whole.completion_tokens
        lp = whole.all_choices()[0].logprobs
        assert lp is not None
        if request.messages is not None:
            assert [e for p in pieces if p.logprobs for e in p.logprobs["content"]] == lp["content"]
        else:
            assert [t for p in pieces if p.logprobs for t in p.logprobs["token_logprobs"]] == lp["token_logprobs"]


# --- JSON and tool calls ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_json_schema_answers_validate(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, temperature: float
) -> None:
    sampling = Sampling(max_tokens=64, temperature=temperature, seed=4, n=2)
    requests = [
        GenRequest(base(tiny_base, adapter), sampling, messages=CHAT, guidance=json_format(SCHEMA))
        for adapter in (None, tiny_lora)
    ] + [GenRequest(base(tiny_base), sampling, prompt=PROMPT, guidance=json_format(SCHEMA))]
    for result in await engine.generate(requests):
        for choice in ok(result).all_choices():
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.text), SCHEMA)
            assert list(json.loads(choice.text)) == ["color", "size", "ok"]  # in the schema's order
    # the grammar's mask comes before the log-probabilities (vLLM's order): what it rules out is never reported
    guided = await one(
        engine,
        GenRequest(base(tiny_base), Sampling(max_tokens=64, logprobs=3), messages=CHAT, guidance=json_format(SCHEMA)),
    )
    content = guided.all_choices()[0].logprobs["content"]  # type: ignore[index]
    assert content[0]["token"] == "{" and content[0]["logprob"] == pytest.approx(0.0, abs=1e-6)
    assert "".join(e["token"] for e in content[:-1]) == guided.text  # the last token is the end of the answer


async def test_json_schema_streams_the_same(engine: TorchEngine, tiny_base: Path) -> None:
    request = GenRequest(base(tiny_base), Sampling(max_tokens=64), messages=CHAT, guidance=json_format(SCHEMA))
    whole = await one(engine, request)
    assert "".join(p.text for p in await chunks(engine, request)) == whole.text
    jsonschema.validate(json.loads(whole.text), SCHEMA)


async def test_json_object_is_an_object_or_cut_short(engine: TorchEngine, tiny_base: Path) -> None:
    guidance = Guidance(response_format={"type": "json_object"})
    result = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=48), messages=CHAT, guidance=guidance))
    assert result.text.startswith("{")
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:
        assert result.finish_reason == "length"


async def test_named_tool_call(engine: TorchEngine, tiny_base: Path) -> None:
    guidance = Guidance(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    result = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=48), messages=CHAT, guidance=guidance))
    (choice,) = result.choices
    assert choice.text == "" and result.text == ""
    assert choice.finish_reason == "stop"  # vLLM's for a named function (OpenAI's too)
    (call,) = choice.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    pieces = await chunks(
        engine, GenRequest(base(tiny_base), Sampling(max_tokens=48), messages=CHAT, guidance=guidance)
    )
    assert "".join(p.text for p in pieces) == ""
    (delta,) = [d for p in pieces for d in p.tool_calls]
    assert delta["index"] == 0 and delta["function"] == call["function"]
    assert pieces[-1].finish_reason == "stop"


@pytest.mark.parametrize("parallel", [False, None])
async def test_required_tool_calls(engine: TorchEngine, tiny_base: Path, parallel: bool | None) -> None:
    guidance = Guidance(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel)
    sampling = Sampling(max_tokens=96, temperature=1.0, seed=2, n=3)
    result = await one(engine, GenRequest(base(tiny_base), sampling, messages=CHAT, guidance=guidance))
    finished = [c for c in result.choices if c.finish_reason != "length"]
    assert finished  # a random model still ends its calls within max_tokens
    for choice in finished:
        assert choice.finish_reason == "tool_calls" and choice.text == ""
        assert choice.tool_calls and (parallel is None or len(choice.tool_calls) == 1)
        for call in choice.tool_calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])


async def test_auto_tool_choice_and_bad_grammars_are_refused(engine: TorchEngine, tiny_base: Path) -> None:
    for choice in ("auto", None):
        guidance = Guidance(tools=TOOLS, tool_choice=choice)
        auto = await refused(engine, GenRequest(base(tiny_base), Sampling(), messages=CHAT, guidance=guidance))
        assert auto.param == "tool_choice" and "vLLM tool-call parser" in auto.message
    # "none": free text, the tools only shown to the template
    free = await one(
        engine,
        GenRequest(
            base(tiny_base), Sampling(max_tokens=8), messages=CHAT, guidance=Guidance(tools=TOOLS, tool_choice="none")
        ),
    )
    assert free.choices == () and free.text
    odd = {"type": "integer", "minimum": 5, "maximum": 1}  # a valid JSON Schema no value fits: no grammar
    bad = await refused(engine, GenRequest(base(tiny_base), Sampling(), messages=CHAT, guidance=json_format(odd)))
    assert bad.param == "response_format" and bad.message.endswith("Invalid range: minimum greater than maximum")
    odd_tool = ({"type": "function", "function": {"name": "f", "parameters": odd}},)
    named = {"type": "function", "function": {"name": "f"}}
    guidance = Guidance(tools=odd_tool, tool_choice=named)
    bad_tool = await refused(engine, GenRequest(base(tiny_base), Sampling(), messages=CHAT, guidance=guidance))
    assert bad_tool.param == "tools"


async def test_tools_and_the_targets_template_reach_the_prompt(engine: TorchEngine, tiny_base: Path) -> None:
    template = "{% for tool in tools %}{{ 'TOOL ' + tool['function']['name'] + '\n' }}{% endfor %}" + CHAT_TEMPLATE
    target = Target(base_id="b", base_dir=tiny_base, chat_template=template)
    guidance = Guidance(tools=TOOLS, tool_choice="none")
    result = await one(engine, GenRequest(target, Sampling(max_tokens=2), messages=CHAT, guidance=guidance))
    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = str(
        tok.apply_chat_template(
            CHAT, tools=list(TOOLS), chat_template=template, tokenize=False, add_generation_prompt=True
        )
    )
    assert text.startswith("TOOL get_weather\nTOOL get_time\n")
    assert result.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    plain = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=2), messages=CHAT, guidance=guidance))
    assert plain.prompt_tokens < result.prompt_tokens  # the model's own template shows no tools


# --- mixtures and fusion ----------------------------------------------------------------------------------


async def test_a_mixture_gives_logprobs_json_and_n(engine: TorchEngine, tiny_base: Path, mixed_adapter: Path) -> None:
    """A one-adapter top-1 mixture answers as its adapter: so do its log-probabilities, echo and JSON."""
    params = {"top_k": 1}
    mixture = TokenMixture(
        composition="mix",
        router="arrow",
        router_params=json.dumps(params),
        adapters=(("id0", "e0", mixed_adapter),),
        make_router=lambda: TOKEN_ROUTERS.build("arrow", params),
    )
    mix, plain = Target("b", tiny_base, mixture=mixture), base(tiny_base, mixed_adapter)
    sampling = Sampling(max_tokens=8, logprobs=2, echo=True, n=2)
    mixed, alone = [
        ok(r) for r in await engine.generate([GenRequest(t, sampling, prompt=PROMPT) for t in (mix, plain)])
    ]
    assert [c.text for c in mixed.choices] == [c.text for c in alone.choices]
    assert logprobs_of(mixed.choices[0])["token_logprobs"][1:] == pytest.approx(
        logprobs_of(alone.choices[0])["token_logprobs"][1:], abs=1e-4
    )
    guided = await one(engine, GenRequest(mix, Sampling(max_tokens=64), messages=CHAT, guidance=json_format(SCHEMA)))
    jsonschema.validate(json.loads(guided.text), SCHEMA)


async def test_fused_requests_refuse_what_one_generation_cannot_give(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path
) -> None:
    members = (FusedMember("base", base(tiny_base)), FusedMember("lora", base(tiny_base, tiny_lora)))
    fusion = Fusion(members=members)
    asks = {
        "logprobs": (Sampling(max_tokens=4, logprobs=1), None),
        "n": (Sampling(max_tokens=4, n=2), None),
        "response_format": (Sampling(max_tokens=4), json_format(SCHEMA)),
        "tools": (Sampling(max_tokens=4), Guidance(tools=TOOLS, tool_choice="required")),
    }
    for param, (sampling, guidance) in asks.items():
        request = GenRequest(base(tiny_base), sampling, prompt=PROMPT, fusion=fusion, guidance=guidance)
        assert (await refused(engine, request)).param == param
    # echo needs no log-probabilities of the fused distribution: it works
    plain = await one(engine, GenRequest(base(tiny_base), Sampling(max_tokens=4), prompt=PROMPT, fusion=fusion))
    echoed = await one(
        engine, GenRequest(base(tiny_base), Sampling(max_tokens=4, echo=True), prompt=PROMPT, fusion=fusion)
    )
    assert echoed.text == PROMPT + plain.text and "fusion" in echoed.extra


def test_capabilities() -> None:
    assert TorchEngine.capabilities.guidance and TorchEngine.capabilities.logprobs and TorchEngine.capabilities.choices
