"""The shapes of OpenAI's Responses API as moerge serves it (stateless): the request with its checks, turned into a
chat (``input`` and ``instructions`` as messages, ``text.format`` and ``tools`` as the chat's ``response_format`` and
``tools``) that plans and answers like /v1/chat/completions; and the answer, whole or as stream events.

Known OpenAI fields are accepted; those about stored state (``previous_response_id``, ``store: true``,
``conversation``, ``prompt``, ``background``) and those moerge cannot honour are refused by name when set to
something other than their default. Anything else is an unknown field, refused by name.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from api.openai.guidance import NAME
from api.openai.protocol import ChatCompletionRequest, MergedAdapters, MoergeDetail
from composition.plan import Query
from core.errors import ValidationFailed

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
MAX_CALL_ID = 256
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys of at most 64 characters, values of at most 512
NOT_STORED = "responses are not stored (moerge's /v1/responses is stateless): send the whole conversation in `input`"
# OpenAI's own values that mean "nothing asked": accepted, anything else refused by name
SERVICE_TIERS = (None, "auto", "default")
TRUNCATIONS = (None, "disabled")
_TOOL_PARAM = re.compile(r"^tools\[(\d+)\]\.function")
_MESSAGE_PARAM = re.compile(r"^messages\[(\d+)\]")


def _refuse(reason: str, param: str) -> ValidationFailed:
    return ValidationFailed(reason, param=param)


def _only(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    if unknown := sorted(set(value) - set(allowed)):
        raise _refuse(f"unknown field {unknown[0]!r}", f"{where}.{unknown[0]}")


def _text_of(content: Any, where: str) -> str:
    """A message's content (a string, or text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse("content must be a string or a list of input_text / output_text parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _refuse("a content part is an object", at)
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise _refuse(f"{kind!r} content is not supported: only text parts (input_text, output_text)", f"{at}.type")
        _only(part, ("type", "text", "annotations", "logprobs"), at)
        if not isinstance(part.get("text"), str):
            raise _refuse("a text part's text is a string", f"{at}.text")
        texts.append(part["text"])
    return "".join(texts)


def _call_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CALL_ID:
        raise _refuse(f"call_id is a string of 1 to {MAX_CALL_ID} characters", f"{where}.call_id")
    return value


class _Chat:
    """The chat messages a request's instructions and input items make, with where each came from (``origins``: the
    field an error in that message is about)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)

    def _last_assistant(self) -> dict[str, Any] | None:
        last = self.messages[-1] if self.messages else None
        return last if last is not None and last["role"] == "assistant" else None

    def item(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise _refuse("an input item is an object (a message, function_call or function_call_output)", where)
        kind = item.get("type", "message")
        if kind == "message":
            self._message(item, where)
        elif kind == "function_call":
            self._function_call(item, where)
        elif kind == "function_call_output":
            _only(item, ("type", "id", "call_id", "output", "status"), where)
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, where) if isinstance(output, list) else None
            if text is None:
                raise _refuse("output is a string or a list of text parts", f"{where}.output")
            self.add({"role": "tool", "tool_call_id": _call_id(item.get("call_id"), where), "content": text}, where)
        elif kind == "item_reference":
            raise _refuse(f"an item_reference names a stored item: {NOT_STORED}", f"{where}.type")
        else:
            raise _refuse(
                f"input items of type {kind!r} are not supported: only message, function_call and function_call_output",
                f"{where}.type",
            )

    def _message(self, item: dict[str, Any], where: str) -> None:
        _only(item, ("type", "role", "content", "id", "status", "phase"), where)
        role = item.get("role")
        if role not in ROLES:
            raise _refuse(f"role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        if "content" not in item:
            raise _refuse("a message's content is required", f"{where}.content")
        text = _text_of(item["content"], where)
        last = self._last_assistant()
        if role == "assistant" and last is not None and last.get("content") is None:
            last["content"] = text  # the text of a turn whose calls came first: one assistant message
            return
        self.add({"role": role, "content": text}, where)

    def _function_call(self, item: dict[str, Any], where: str) -> None:
        """A call the model made (handed back with its output): a tool call of the turn's assistant message."""
        _only(item, ("type", "id", "call_id", "name", "arguments", "status"), where)
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _refuse("must be 1 to 64 letters, digits, underscores or dashes", f"{where}.name")
        if not isinstance(item.get("arguments"), str):
            raise _refuse("arguments are a JSON string", f"{where}.arguments")
        call = {
            "id": _call_id(item.get("call_id"), where),
            "type": "function",
            "function": {"name": name, "arguments": item["arguments"]},
        }
        last = self._last_assistant()
        if last is not None:
            last.setdefault("tool_calls", []).append(call)
        else:
            self.add({"role": "assistant", "content": None, "tool_calls": [call]}, where)


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/responses."""

    model: str
    input: str | list[Any]
    instructions: str | None = None
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # accepted only at their neutral values (stored state, hosted features)
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: Any | None = None
    prompt: Any | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    service_tier: str | None = None
    # LoRAX's extension, as on /v1/chat/completions: adapters of `model` applied together with weights
    merged_adapters: MergedAdapters | None = None

    def check_refusals(self) -> None:
        """The fields set to something moerge does not do, refused by name."""
        if self.previous_response_id is not None:
            raise _refuse(f"previous_response_id is not supported: {NOT_STORED}", "previous_response_id")
        if self.store:
            raise _refuse(f"store: true is not supported: {NOT_STORED}; leave store out or set it false", "store")
        if self.conversation is not None:
            raise _refuse(f"conversation is not supported: {NOT_STORED}", "conversation")
        if self.prompt is not None:
            raise _refuse("prompt (a stored prompt template) is not supported: send instructions and input", "prompt")
        if self.background:
            raise _refuse(
                "background responses are not supported (they are stored): leave background out", "background"
            )
        if self.include:
            raise _refuse(f"include {self.include[0]!r} is not supported: leave include out", "include")
        if self.reasoning is not None and any(v is not None for v in self.reasoning.values()):
            raise _refuse("reasoning options are not supported: leave reasoning out", "reasoning")
        if self.truncation not in TRUNCATIONS:
            raise _refuse(
                "truncation 'auto' is not supported: an input longer than the model's context fails", "truncation"
            )
        if self.top_logprobs:
            raise _refuse("top_logprobs is not supported on /v1/responses (ask /v1/chat/completions)", "top_logprobs")
        if self.max_tool_calls is not None:
            raise _refuse("max_tool_calls is not supported: leave it out", "max_tool_calls")
        if self.service_tier not in SERVICE_TIERS:
            raise _refuse(f"service_tier {self.service_tier!r} is not supported: leave it out", "service_tier")
        if self.stream_options is not None:
            _only(self.stream_options, ("include_obfuscation",), "stream_options")
        if self.metadata is not None:
            if len(self.metadata) > MAX_METADATA:
                raise _refuse(f"at most {MAX_METADATA} key-value pairs", "metadata")
            for key, value in self.metadata.items():
                if len(key) > 64 or len(value) > 512:
                    raise _refuse("keys are at most 64 characters, values at most 512", f"metadata.{key[:64]}")

    def chat(self) -> _Chat:
        """``instructions`` (a system message, first) and ``input`` as chat messages."""
        chat = _Chat()
        if self.instructions:
            chat.add({"role": "system", "content": self.instructions}, "instructions")
        if isinstance(self.input, str):
            if not self.input:
                raise _refuse("input must be a non-empty string or a non-empty list of input items", "input")
            chat.add({"role": "user", "content": self.input}, "input")
            return chat
        if not self.input:
            raise _refuse("input must be a non-empty string or a non-empty list of input items", "input")
        for i, item in enumerate(self.input):
            chat.item(item, f"input[{i}]")
        return chat

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as a chat's ``response_format`` (checked there)."""
        if self.text is None:
            return None
        _only(self.text, ("format", "verbosity"), "text")
        if self.text.get("verbosity") not in (None, "medium"):
            raise _refuse("verbosity is not supported: leave it out", "text.verbosity")
        form = self.text.get("format")
        if form is None:
            return None
        if not isinstance(form, dict):
            raise _refuse("format is an object: {type: text | json_object | json_schema, ...}", "text.format")
        if form.get("type") != "json_schema":
            return dict(form)
        _only(form, ("type", "name", "schema", "strict", "description"), "text.format")
        spec = {key: form[key] for key in ("name", "schema", "strict", "description") if key in form}
        return {"type": "json_schema", "json_schema": spec}

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """``tools`` (function tools only, in the Responses shape) as a chat's tools (checked there)."""
        if not self.tools:
            return None
        tools = []
        for i, tool in enumerate(self.tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict):
                raise _refuse('a tool is {"type": "function", "name", "parameters", ...}', where)
            kind = tool.get("type")
            if kind != "function":
                raise _refuse(
                    f"tools of type {kind!r} are not supported: only function tools (moerge runs no hosted tools)",
                    f"{where}.type",
                )
            _only(tool, ("type", "name", "description", "parameters", "strict"), where)
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            tools.append({"type": "function", "function": function})
        return tools

    def chat_tool_choice(self) -> Any:
        """``tool_choice`` as a chat's: none, auto, required, or a named function."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return choice
        kind = choice.get("type")
        if kind != "function":
            raise _refuse(
                f"tool_choice of type {kind!r} is not supported: none, auto, required or a named function",
                "tool_choice.type",
            )
        _only(choice, ("type", "name"), "tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}

    def as_query(self, default_max_tokens: int, request_id: str) -> Query:
        """The request checked, as the composition's Query (a chat, as /v1/chat/completions plans it)."""
        self.check_refusals()
        chat = self.chat()
        request = ChatCompletionRequest(
            model=self.model,
            messages=chat.messages,
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            user=self.user,
            response_format=self.response_format(),
            tools=self.chat_tools(),
            tool_choice=self.chat_tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls,
            merged_adapters=self.merged_adapters,
            stream=self.stream,
        )
        try:
            return request.as_query(default_max_tokens, request_id)
        except ValidationFailed as exc:  # the chat's field names as this request's
            raise ValidationFailed(exc.message, param=_param(exc.param, chat.origins), code=exc.code) from None

    # -- what a response repeats of its request ----------------------------------------------------------------

    def echo_tools(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "function",
                "name": tool.get("name"),
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
            }
            for tool in self.tools or ()
        ]

    def echo_tool_choice(self) -> str | dict[str, Any]:
        if self.tool_choice is None:
            return "auto"
        if isinstance(self.tool_choice, dict):
            return {"type": "function", "name": self.tool_choice.get("name")}
        return str(self.tool_choice)

    def echo_text(self) -> dict[str, Any]:
        form = (self.text or {}).get("format") or {"type": "text"}
        return {"format": form}


def _param(param: str | None, origins: list[str]) -> str | None:
    """A chat request's field as the Responses request names it."""
    if param is None:
        return None
    for chat, responses in (
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
        ("tool_choice.function.name", "tool_choice.name"),
    ):
        if param == chat or param.startswith(f"{chat}."):
            return responses + param[len(chat) :]
    if found := _TOOL_PARAM.match(param):
        return f"tools[{found.group(1)}]{param[found.end() :]}"
    if found := _MESSAGE_PARAM.match(param):
        index = int(found.group(1))
        return origins[index] if index < len(origins) else "input"
    return param


# -- the answer -------------------------------------------------------------------------------------------------
# The shapes OpenAI's server answers with (the `openai` SDK's `Response` and its stream events). Every field is
# always present (null included), as OpenAI's; only moerge's extension is left out when unset.


class OutputText(msgspec.Struct, kw_only=True):
    type: str = "output_text"
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    """An answer's text: one ``output_text`` part."""

    id: str
    status: str  # in_progress | completed | incomplete
    role: str = "assistant"
    content: list[OutputText]


class FunctionCallItem(msgspec.Struct, kw_only=True, tag_field="type", tag="function_call"):
    """A call of one of the request's function tools; the caller runs it and sends a function_call_output."""

    id: str
    call_id: str
    name: str
    arguments: str  # a JSON object, as a string
    status: str


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int) -> ResponseUsage:
        return cls(input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens)


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: str  # max_output_tokens


class ResponseError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """POST /v1/responses, not streamed; with ``stream: true``, the ``response`` of the stream's lifecycle events."""

    id: str  # resp_...
    object: str  # response
    created_at: int
    status: str  # in_progress | completed | incomplete
    completed_at: int | None
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None
    reasoning: None
    store: bool
    background: bool
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: str
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]
    moerge: MoergeDetail | None = None  # moerge's extension: a composition's member answers


# -- stream events: `event: <type>` and `data: <one of these>`, numbered by `sequence_number` ------------------


class ResponseEvent(msgspec.Struct, kw_only=True):
    """response.created, response.in_progress, response.completed, response.incomplete."""

    type: str
    sequence_number: int
    response: Response


class OutputItemEvent(msgspec.Struct, kw_only=True):
    """response.output_item.added / .done."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(msgspec.Struct, kw_only=True):
    """response.content_part.added / .done."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(msgspec.Struct, kw_only=True):
    type: str  # response.output_text.delta
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class TextDoneEvent(msgspec.Struct, kw_only=True):
    type: str  # response.output_text.done
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ArgumentsDeltaEvent(msgspec.Struct, kw_only=True):
    type: str  # response.function_call_arguments.delta
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(msgspec.Struct, kw_only=True):
    type: str  # response.function_call_arguments.done
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(msgspec.Struct, kw_only=True):
    """An error once the stream has begun (before, errors are HTTP errors in moerge's usual shape)."""

    type: str  # error
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (
    ResponseEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)
