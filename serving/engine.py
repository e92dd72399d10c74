"""The Engine protocol: generate a batch of requests (base model + optional adapter), or stream one.

Two engines implement it: ``serving.vllm`` (managed or remote vLLM servers, multi-LoRA batches) and
``serving.torch`` (transformers + PEFT in process). The API resolves a model name to a ``Target`` and
hands the engine ``GenRequest``s; it never talks to vLLM or transformers itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from core.errors import MoergeError

if TYPE_CHECKING:
    from serving.mixture.route import MixtureRouter


class EngineUnavailable(MoergeError):
    """The engine (a vLLM server) is down or starting: the client should retry shortly."""

    status_code = 503
    error_type = "server_error"
    default_code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after: int = 30, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class GenerationFailed(MoergeError):
    """A request failed inside the engine (e.g. its server died mid-request)."""

    status_code = 502
    error_type = "server_error"
    default_code = "generation_failed"


class GenerationTimedOut(GenerationFailed):
    """A generation ran past its time limit (``MOERGE_MAX_GENERATION_S``) and was stopped."""

    status_code = 504
    default_code = "generation_timeout"


# The vllm_xargs key under which a request brings its mixture slot's per-member vector (serving/mixture/slot.py).
MIXTURE_XARG = "moerge_mix"


@dataclass(frozen=True)
class TokenMixture:
    """A token-level composition: LoRA adapters of one base mixed per token and module by a token router
    (``routers/token``, built by ``make_router``; the mixture layer is ``serving/mixture``). Runs as one adapter
    slot in a managed vLLM server running moerge's op (``slot_params``), else in the torch engine (one loaded model
    per distinct mixture; also the reference)."""

    composition: str
    router: str
    router_params: str  # canonical JSON (sorted keys), so the mixture is hashable
    adapters: tuple[tuple[str, str, Path], ...]  # (expert id, slug, folder), in the composition's order
    # The adapters' router states (Arrow prototypes, PHATGOOSE gates), read from the router artifacts.
    states: tuple[dict[str, Any], ...] = field(default=(), compare=False, hash=False, repr=False)
    # Builds the router named by ``router`` and ``router_params`` (the composition layer passes one from
    # ``routers/token``, which serving may not import); the engine calls it once per loaded mixture.
    make_router: Callable[[], MixtureRouter] = field(kw_only=True, compare=False, hash=False, repr=False)
    # How moerge's vLLM op runs this router in one adapter slot (canonical JSON of the router's ``slot_params``:
    # kind, top_k, temperature, request; ``serving/mixture/slot.py``), or "" when only the torch engine can.
    slot_params: str = field(default="", kw_only=True)

    @property
    def key(self) -> str:
        identity = repr((self.router, self.router_params, [(i, str(folder)) for i, _, folder in self.adapters]))
        return f"mixture:{self.composition}:{hashlib.sha1(identity.encode()).hexdigest()[:12]}"

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = json.loads(self.router_params)
        return params

    @property
    def slugs(self) -> list[str]:
        return [slug for _, slug, _ in self.adapters]


@dataclass(frozen=True)
class Target:
    """What to run: a base model folder, optionally with one LoRA adapter folder on top, or a token-level
    mixture of several adapters of that base."""

    base_id: str  # registry id of the base (or merged full model): one vLLM server per base
    base_dir: Path
    adapter_id: str | None = None
    adapter_dir: Path | None = None
    max_lora_rank: int = 8
    served_name: str = ""  # the registry slug answering, reported as `model` in responses
    mixture: TokenMixture | None = None
    # The base's chat template (Jinja text) where the registry sets one in place of the model's own (e.g. one
    # that renders tools), and the vLLM tool-call parser that reads calls out of its answers (e.g. ``hermes``).
    chat_template: str | None = field(default=None, compare=False, repr=False)
    tool_parser: str | None = None

    @property
    def key(self) -> str:
        if self.mixture is not None:
            return self.mixture.key
        return self.adapter_id or self.base_id


# A temperature or top_p below this means the likeliest token: greedy decoding (vLLM's rule for temperature).
# Taken as they are, 1e-138 turns into NaN probabilities, or every token dropped, in float32 sampling.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # vLLM's sampling extensions (fixed-length generation, as in vLLM's serving benchmark)
    min_tokens: int = 0  # end-of-sequence and stop strings cannot end the answer before this many tokens
    ignore_eos: bool = False  # keep generating past end-of-sequence until max_tokens
    # OpenAI's: several answers to one request, each token's log-probability (None: off; N: with the N likeliest
    # alternatives), and a text completion that repeats its prompt (with the prompt's log-probabilities)
    n: int = 1
    logprobs: int | None = None
    echo: bool = False


@dataclass(frozen=True)
class Guidance:
    """What an answer must look like: OpenAI's ``response_format`` (``json_object``, or ``json_schema`` with its
    schema) and ``tools`` with ``tool_choice`` (the calls are parsed out of the answer). vLLM decodes under them
    with its structured outputs and tool parsers; an engine without ``Capabilities.guidance`` refuses them. The
    dicts are the OpenAI shapes, already validated (api/openai/protocol.py)."""

    response_format: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def structured(self) -> bool:
        """The answer is a JSON value (an object, or calls of tools): comparable once parsed."""
        kind = (self.response_format or {}).get("type")
        return kind in ("json_object", "json_schema")

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def fields(self) -> dict[str, Any]:
        """The OpenAI request fields this stands for."""
        body: dict[str, Any] = {}
        if self.response_format is not None:
            body["response_format"] = self.response_format
        if self.tools:
            body["tools"] = list(self.tools)
            if self.tool_choice is not None:
                body["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = self.parallel_tool_calls
        return body


@dataclass(frozen=True)
class FusedMember:
    """One member of a fused request: its name (the expert's slug, used in errors and the weight summary),
    what runs it (the shared base, or a LoRA adapter of it) and its prior weight (the router's)."""

    name: str
    target: Target
    weight: float = 1.0


@dataclass(frozen=True)
class Fusion:
    """Logit fusion: the members decode ONE answer together, mixing their next-token distributions with
    per-step weights (``serving/logit_fusion.py``). ``mode``: ``static`` mixes with the prior weights,
    ``entropy`` reweights them every step by each member's confidence, with temperature ``tau``."""

    members: tuple[FusedMember, ...]
    mode: Literal["static", "entropy"] = "entropy"
    tau: float = 1.0


@dataclass
class GenRequest:
    target: Target  # for a fused request, the first member's target (it picks the base the group runs on)
    sampling: Sampling
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # plain completion
    request_id: str = ""
    # A token-level mixture's per-request router bias, one value per adapter (GLIDER's global preference).
    router_bias: tuple[float, ...] | None = None
    # A weighted mixture's per-request weights, one per adapter (the router's scores, or the client's).
    mixture_weights: tuple[float, ...] | None = None
    fusion: Fusion | None = None  # set: several members decode this request together (torch engine only)
    guidance: Guidance | None = None  # JSON or tool calls the answer must be (None: free text)


@dataclass(frozen=True)
class Choice:
    """One of a generation's answers (``Sampling.n`` of them): its text, why it ended, the tool calls parsed out of
    it and its log-probabilities, both in OpenAI's shapes (a chat's ``{"content": [...]}`` or a text completion's
    ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``)."""

    index: int
    text: str
    finish_reason: str
    tool_calls: tuple[dict[str, Any], ...] = ()
    logprobs: dict[str, Any] | None = None


@dataclass
class GenResult:
    text: str
    finish_reason: Literal["stop", "length"] | str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # every answer when the engine gives more than text (n > 1, tool calls, logprobs); else empty: one answer,
    # ``text`` (``all_choices`` reads both alike)
    choices: tuple[Choice, ...] = ()

    def all_choices(self) -> tuple[Choice, ...]:
        return self.choices or (Choice(0, self.text, str(self.finish_reason)),)


@dataclass
class TokenTrace:
    """Which adapters acted on each token in each layer of a token-level mixture: ``weights[l][t][e]`` is the
    mixing weight of adapter ``e`` on token ``t`` in layer ``l``, averaged over the layer's adapted modules
    (0 where the adapter was not among the chosen)."""

    tokens: list[str]
    prompt_tokens: int  # tokens[:prompt_tokens] are the prompt, the rest the completion
    experts: list[str]
    layers: list[str]
    weights: list[list[list[float]]]
    top_k: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "experts": self.experts,
            "layers": self.layers,
            "top_k": self.top_k,
            "weights": self.weights,
        }


@dataclass
class GenChunk:
    """One piece of a stream: new text, and on the last chunk the finish reason and token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    index: int = 0  # which of the request's n answers this piece belongs to
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI's tool-call deltas ({"index", "id", "function": ...})
    logprobs: dict[str, Any] | None = None  # this piece's tokens' log-probabilities, OpenAI-shaped


@dataclass(frozen=True)
class Capabilities:
    """What an engine can run beyond plain requests; callers ask this instead of probing for methods."""

    token_mixtures: bool = False  # Targets with a TokenMixture (per-token LoRA mixtures)
    logit_fusion: bool = False  # GenRequest.fusion: several experts decoding one answer together
    traces: bool = False  # trace(): per token and layer, each adapter's mixing weight
    guidance: bool = False  # GenRequest.guidance: JSON answers and tool calls
    logprobs: bool = False  # Sampling.logprobs and echo
    choices: bool = False  # Sampling.n > 1


@runtime_checkable
class Engine(Protocol):
    name: str
    capabilities: Capabilities

    async def generate(self, requests: list[GenRequest]) -> list[GenResult | BaseException]:
        """Run all requests concurrently (one batch where the engine can); failures are returned per request."""
        ...

    def stream(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        """Stream one request's completion."""
        ...

    async def status(self) -> list[dict[str, Any]]:
        """The engine's servers or models and their state, for /api/health and the admin dashboard."""
        ...

    async def trace(self, request: GenRequest, completion: str = "") -> TokenTrace:
        """The token-level trace of a mixture request (only where ``capabilities.traces``)."""
        ...

    async def forget(self, adapter_id: str, names: Collection[str]) -> None:
        """A deleted adapter: unload it wherever this engine's servers may hold it, under its id or any of
        ``names`` (its slug and aliases, which clients of a remote server may have used)."""
        ...

    async def close(self) -> None: ...
