"""OpenAI-compatible shapes: the requests of /v1/chat/completions and /v1/completions with their validation,
and the answers (models, completions, stream chunks, errors).

Known OpenAI fields are accepted (those moerge cannot honour are refused by name when set to something
other than their default); anything else is an unknown field, refused by name.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from api.openai.guidance import checked_tool_calls, guidance_of
from api.schemas import TokenTraceOut
from composition.plan import Query
from core.errors import ValidationFailed
from serving.engine import GREEDY_BELOW, Guidance, Sampling

MAX_TOKENS_LIMIT = 8192
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as vLLM's server takes it (torch's generators overflow past)
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16  # answers to one request
MAX_TOP_LOGPROBS = 20  # alternatives per token (vLLM's default --max-logprobs)


MAX_MERGED_ADAPTERS = 16
MAX_MERGE_WEIGHT = 10.0


class MergedAdapters(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """LoRAX's ``merged_adapters``: adapters of ``model`` (its base) applied together with these weights in one
    generation (a weighted mixture: vLLM's adapter slot with the weights per request, or the torch engine)."""

    ids: list[str]
    weights: list[float]
    merge_strategy: str = "linear"
    # LoRAX's fields for its other strategies: accepted only at their neutral values
    majority_sign_method: str | None = None
    density: float | None = None

    def checked(self) -> tuple[tuple[str, float], ...]:
        where = "merged_adapters"
        if self.merge_strategy != "linear":
            raise ValidationFailed(
                f"merge_strategy {self.merge_strategy!r} is not supported: only linear (a weighted sum of the "
                "adapters' updates); merge them into a new adapter with POST /api/merges for ties, dare or breadcrumbs",
                param=f"{where}.merge_strategy",
            )
        if self.majority_sign_method is not None or self.density not in (None, 1.0):
            raise ValidationFailed(
                "majority_sign_method and density go with ties / dare only", param=f"{where}.density"
            )
        if not 1 <= len(self.ids) <= MAX_MERGED_ADAPTERS:
            raise ValidationFailed(f"name 1 to {MAX_MERGED_ADAPTERS} adapters", param=f"{where}.ids")
        if len(self.weights) != len(self.ids):
            raise ValidationFailed(f"give one weight per adapter ({len(self.ids)})", param=f"{where}.weights")
        for i, weight in enumerate(self.weights):
            if not (math.isfinite(weight) and abs(weight) <= MAX_MERGE_WEIGHT):
                raise ValidationFailed(
                    f"must be a finite number between -{MAX_MERGE_WEIGHT:g} and {MAX_MERGE_WEIGHT:g}",
                    param=f"{where}.weights[{i}]",
                )
        for i, ref in enumerate(self.ids):
            if not ref or len(ref) > 256:
                raise ValidationFailed("must be an adapter's slug or id", param=f"{where}.ids[{i}]")
        return tuple(zip(self.ids, (float(w) for w in self.weights), strict=True))


class _Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    # vLLM's extensions, passed through: a fixed-length answer (benchmarks)
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    user: str | None = None
    # accepted for compatibility; only their neutral values are supported
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # moerge's extension: a token-level composition's per-token, per-layer adapter choices in `moerge.trace`
    moerge_trace: bool = False
    # LoRAX's extension: adapters of `model` applied together with weights in one generation
    merged_adapters: MergedAdapters | None = None

    def checked_trace(self) -> bool:
        if self.moerge_trace and self.stream:
            raise ValidationFailed("moerge_trace is given with non-streamed responses only", param="moerge_trace")
        return self.moerge_trace

    def _logprobs(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: none asked)."""
        raise NotImplementedError

    def sampling(self, default_max_tokens: int) -> Sampling:
        requested = self._max_tokens()
        max_tokens = default_max_tokens if requested is None else requested
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise ValidationFailed(f"must be between 1 and {MAX_TOKENS_LIMIT}", param=self._max_tokens_field())
        temperature = 1.0 if self.temperature is None else self.temperature
        if not 0.0 <= temperature <= 2.0:
            raise ValidationFailed("temperature must be between 0 and 2", param="temperature")
        top_p = 1.0 if self.top_p is None else self.top_p
        if not 0.0 < top_p <= 1.0:
            raise ValidationFailed("top_p must be in (0, 1]", param="top_p")
        if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:
            temperature, top_p = 0.0, 1.0
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValidationFailed("seed must be a 64-bit integer (-2^63 to 2^63-1)", param="seed")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValidationFailed("stop takes at most 4 non-empty strings", param="stop")
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_N:
            raise ValidationFailed(f"n must be between 1 and {MAX_N}", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValidationFailed(f"{name} is not supported", param=name)
        if self.logit_bias:
            raise ValidationFailed("logit_bias is not supported", param="logit_bias")
        logprobs = self._logprobs()
        min_tokens = self.min_tokens or 0
        if not 0 <= min_tokens <= max_tokens:
            raise ValidationFailed(f"min_tokens must be between 0 and max_tokens ({max_tokens})", param="min_tokens")
        return Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stops),
            seed=self.seed,
            min_tokens=min_tokens,
            ignore_eos=bool(self.ignore_eos),
            n=n,
            logprobs=logprobs,
            echo=self._echo(),
        )

    def _echo(self) -> bool:
        return False

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _max_tokens_field(self) -> str:
        return "max_tokens"


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise ValidationFailed("logprobs is true or false in a chat (top_logprobs says how many)", param="logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValidationFailed(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if not self.logprobs:
            if self.top_logprobs:
                raise ValidationFailed("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def guidance(self) -> Guidance | None:
        return guidance_of(self.response_format, self.tools, self.tool_choice, self.parallel_tool_calls)

    def _max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def checked_messages(self) -> list[dict[str, Any]]:
        """Validate the messages and flatten text content parts; returns plain {role, content} dicts."""
        if not self.messages:
            raise ValidationFailed("messages must be a non-empty list", param="messages")
        clean: list[dict[str, Any]] = []
        for i, message in enumerate(self.messages):
            where = f"messages[{i}]"
            role = message.get("role")
            if role not in ROLES:
                raise ValidationFailed(f"role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role")
            if unknown := set(message) - {"role", "content", "name", "tool_call_id", "tool_calls", "refusal"}:
                raise ValidationFailed(f"unknown field {sorted(unknown)[0]!r}", param=f"{where}.{sorted(unknown)[0]}")
            clean.append(_message(role, message, where))
        return clean

    def as_query(self, default_max_tokens: int, request_id: str) -> Query:
        """The request checked (messages, then sampling) as the composition's Query."""
        messages = self.checked_messages()
        guidance = self.guidance()
        return Query(
            self.model,
            self.sampling(default_max_tokens),
            messages=messages,
            request_id=request_id,
            merged_adapters=self.merged_adapters.checked() if self.merged_adapters is not None else None,
            guidance=guidance,
        )


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def checked_prompt(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValidationFailed("exactly one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ValidationFailed("prompt must be a non-empty string", param="prompt")
        if self.suffix:
            raise ValidationFailed("suffix is not supported", param="suffix")
        if self.best_of is not None:
            raise ValidationFailed(
                "best_of is not supported (vLLM 0.32's completions API has none); ask for n answers instead",
                param="best_of",
            )
        return prompt

    def _logprobs(self) -> int | None:
        if self.logprobs is None or self.logprobs is False:
            return None
        if isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValidationFailed(
                f"logprobs is how many alternatives per token: 0 to {MAX_TOP_LOGPROBS}", param="logprobs"
            )
        return self.logprobs

    def _echo(self) -> bool:
        return bool(self.echo)

    def as_query(self, default_max_tokens: int, request_id: str) -> Query:
        """The request checked (prompt, then sampling) as the composition's Query."""
        prompt = self.checked_prompt()
        return Query(
            self.model,
            self.sampling(default_max_tokens),
            prompt=prompt,
            request_id=request_id,
            merged_adapters=self.merged_adapters.checked() if self.merged_adapters is not None else None,
        )


def _message(role: str, message: dict[str, Any], where: str) -> dict[str, Any]:
    """One chat message as the engines take it: its role (developer as system), its text, and a conversation's
    tool calls and tool results as OpenAI gives them."""
    clean: dict[str, Any] = {"role": "system" if role == "developer" else role}
    calls = message.get("tool_calls")
    if role == "assistant" and calls is not None:
        clean["tool_calls"] = checked_tool_calls(calls, f"{where}.tool_calls")
        content = message.get("content")
        clean["content"] = None if content is None else _text_of(content, where)
    else:
        if calls is not None:
            raise ValidationFailed("only assistant messages have tool_calls", param=f"{where}.tool_calls")
        clean["content"] = _text_of(message.get("content"), where)
    call_id = message.get("tool_call_id")
    if role == "tool":
        if not isinstance(call_id, str) or not call_id or len(call_id) > 256:
            raise ValidationFailed("a tool message names the call it answers", param=f"{where}.tool_call_id")
        clean["tool_call_id"] = call_id
    elif call_id is not None:
        raise ValidationFailed("only tool messages have a tool_call_id", param=f"{where}.tool_call_id")
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ValidationFailed("name is a string of 1 to 64 characters", param=f"{where}.name")
        clean["name"] = name
    return clean


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValidationFailed("only text content parts are supported", param=f"{where}.content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ValidationFailed("content must be a string or a list of text parts", param=f"{where}.content")


# -- responses ------------------------------------------------------------------------------------------------
# The shapes vLLM's and OpenAI's servers answer with. Only fields that OpenAI leaves out when unset have a
# default in an ``omit_defaults`` struct; every other field is always present (null included).


class ModelInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``moerge`` of a model entry: an expert has ``expert_id``, a composition ``router`` and ``k``."""

    kind: str  # lora | full | composition
    expert_id: str | None = None
    router: str | None = None
    k: int | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    """One entry of GET /v1/models: an expert or a composition."""

    id: str
    object: str = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None  # an adapter's base model
    moerge: ModelInfo


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class MemberAnswer(msgspec.Struct, kw_only=True):
    """One chosen expert's own answer in a composed completion (``error`` set when it failed)."""

    expert: str
    weight: float
    part: str | None  # a decomposed query: the part it answered
    text: str
    error: str | None


class MoergeDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """moerge's extension to an answer (OpenAI clients keep unknown fields): a composition's answer carries
    each expert's own answer and the aggregator's reason; one asked with ``moerge_trace`` the token-level
    routes."""

    answers: list[MemberAnswer] | None = None
    aggregation: str | None = None
    trace: TokenTraceOut | None = None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | None  # null when the answer is tool calls only
    tool_calls: list[ToolCall] | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, kw_only=True):
    """One generated token of a chat answer, its log-probability and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob] | None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """A text completion's tokens with their log-probabilities (with ``echo``, the prompt's first: its first
    token has none) and the likeliest alternatives of each."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    """A text completion's choice, in an answer and in a stream chunk alike."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class ChatCompletion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """POST /v1/chat/completions, not streamed."""

    id: str
    object: str  # chat.completion
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    moerge: MoergeDetail | None = None  # absent for a plain answer


class Completion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """POST /v1/completions, not streamed."""

    id: str
    object: str  # text_completion
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    moerge: MoergeDetail | None = None


class FunctionDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None  # the call's first delta
    arguments: str | None = None  # the arguments' text, in pieces


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int  # which call of the answer
    id: str | None = None  # the call's first delta
    type: str | None = None
    function: FunctionDelta | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None  # the first chunk only
    content: str | None = None  # absent in a chunk that only finishes
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: str  # chat.completion.chunk
    created: int
    model: str
    choices: list[ChatChunkChoice]  # empty in the usage chunk
    usage: Usage | None = None  # the last chunk, with stream_options.include_usage


class CompletionChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One `data:` event of a streamed text completion."""

    id: str
    object: str  # text_completion
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None  # the field at fault
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error, /api and /v1 alike (and inside a stream once it has begun)."""

    error: ErrorDetail
