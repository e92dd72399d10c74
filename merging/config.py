"""A merge request: what to merge, how, and what to write, as JSON or a mergekit-style YAML.

The fields are mergekit's (``merge_method``, ``base_model``, ``models[].model`` / ``.parameters``,
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``, ``chat_template``) so its YAML files import
as they are; ``model`` and ``base_model`` name registered experts (slug, alias or id). As in mergekit, a
per-model parameter (``weight``, ``density``, ...) under the top-level ``parameters`` is every model's
default, and for task-vector methods an entry naming the base itself is not an input (its task vector is
zero). What mergekit can do and moerge cannot (layer ``slices``, a union tokenizer, per-layer gradients)
is refused by name. moerge adds ``name`` (the result's slug), ``output`` (a full model, a LoRA by truncated
SVD, or a LoRA by concatenation), ``seed`` (DARE) and ``description``. Checks that need no files happen
here; the plan (``merging/plan.py``) checks the inputs against each other.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from core.errors import ValidationFailed
from core.lora import VALID_LORA_RANKS  # a merged LoRA must fit vLLM's --max-lora-rank
from merging.methods import METHODS, InputParams, MergeMethod, MethodConfig
from registry.documents import load_yaml
from registry.schemas import check_slug, decode_strict

OutputFormat = Literal["full", "lora", "cat"]
OUTPUT_FORMATS: tuple[str, ...] = ("full", "lora", "cat")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# Methods whose merged delta is a weighted sum of the inputs' deltas: only they can be written as an exact
# concatenation of the adapters (``cat``).
LINEAR_IN_DELTAS: frozenset[str] = frozenset({"task_arithmetic", "linear"})


class ModelEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    model: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class OutputSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    format: str = "full"  # full | lora (truncated SVD of the merged delta) | cat (adapters stacked, exact)
    rank: int | None = None  # lora: the rank kept by the SVD (default: the inputs' largest, so the base's
    # running vLLM server, started for them, can serve the result at once)


class MergeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    dtype: str | None = None  # of the output (mergekit: of the computation, which moerge does in float32);
    # default the base's (or the first input's)
    out_dtype: str | None = None  # mergekit's name for the output's dtype; wins over dtype
    tokenizer_source: str | None = None  # mergekit: only the base's tokenizer ("base") is supported
    chat_template: str | None = None  # mergekit: "auto" (the base's) or a Jinja template for the output
    slices: Any = None  # mergekit's layer slicing: refused with a reason rather than as an unknown field
    name: str | None = None  # slug of the merged expert; default <method>-<short job id>
    description: str = ""
    output: OutputSpec = msgspec.field(default_factory=OutputSpec)
    seed: int = 0


class CheckedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request whose method, parameters and output passed every check that needs no files."""

    request: MergeRequest
    method: MergeMethod
    config: MethodConfig
    inputs: tuple[InputParams, ...]
    positions: tuple[int, ...]  # each input's index in request.models (the base's own entry is not an input)
    input_parameters: tuple[dict[str, Any], ...]  # each input's parameters, top-level defaults filled in

    @property
    def output(self) -> OutputSpec:
        return self.request.output

    @property
    def models(self) -> list[ModelEntry]:
        """The entries that are inputs, in order."""
        return [self.request.models[i] for i in self.positions]

    def model_param(self, index: int) -> str:
        """The request field naming input ``index``."""
        return f"models[{self.positions[index]}].model"

    @property
    def output_dtype(self) -> str | None:
        return self.request.out_dtype or self.request.dtype


def parse_request(raw: bytes | str | dict[str, Any], *, yaml_text: bool = False) -> MergeRequest:
    """Decode JSON (or a parsed dict), or YAML with ``yaml_text``; errors name the field."""
    if yaml_text and not isinstance(raw, dict):
        loaded = load_yaml(raw, param="body", what="the body")  # bounded: no aliases, size and depth capped
        if not isinstance(loaded, dict):
            raise ValidationFailed("a merge config is a mapping (merge_method, models, ...)", param="body")
        raw = loaded
    if isinstance(raw, dict) and "method" in raw and "merge_method" not in raw:  # the natural short name
        raw = {("merge_method" if k == "method" else k): v for k, v in raw.items()}
    request: MergeRequest = decode_strict(raw, MergeRequest)
    return request


def check_request(request: MergeRequest) -> CheckedRequest:
    """Method known, its parameters typed and in range, output consistent; before touching any file."""
    if not request.models:
        raise ValidationFailed("models: give at least one model to merge", param="models")
    if request.name is not None:
        check_slug(request.name, param="name")
    for field_name in ("dtype", "out_dtype"):
        value = getattr(request, field_name)
        if value is not None and value not in DTYPES:
            raise ValidationFailed(f"{field_name}: {value!r} is not one of {', '.join(DTYPES)}", param=field_name)
    _check_mergekit_fields(request)
    try:
        method = METHODS.get(request.merge_method)
    except ValidationFailed as exc:
        raise _renamed(exc, ()) from exc
    positions = _input_positions(request, method)
    global_params, defaults = _split_parameters(request.parameters, method)
    input_parameters = tuple({**defaults, **request.models[i].parameters} for i in positions)
    try:
        config, inputs = METHODS.configure(request.merge_method, global_params, list(input_parameters))
    except ValidationFailed as exc:
        raise _renamed(exc, positions) from exc
    output = request.output
    if output.format not in OUTPUT_FORMATS:
        raise ValidationFailed(
            f"output.format: {output.format!r} is not one of {', '.join(OUTPUT_FORMATS)}", param="output.format"
        )
    if output.rank is not None:
        if output.format != "lora":
            raise ValidationFailed("output.rank: only a `lora` output has a rank to choose", param="output.rank")
        if output.rank not in VALID_LORA_RANKS:
            raise ValidationFailed(
                f"output.rank: {output.rank} is not a rank vLLM serves ({', '.join(map(str, VALID_LORA_RANKS))})",
                param="output.rank",
            )
    if output.format != "full" and request.chat_template not in (None, "auto"):
        raise ValidationFailed(
            "chat_template: a LoRA output is served with its base's tokenizer and chat template; "
            "give one only with output.format: full",
            param="chat_template",
        )
    if output.format == "cat" and method.name not in LINEAR_IN_DELTAS:
        raise ValidationFailed(
            f"output.format: `cat` is exact only for {' and '.join(sorted(LINEAR_IN_DELTAS))} "
            f"({method.name} trims or elects signs per entry); use `lora` (SVD) or `full`",
            param="output.format",
        )
    if output.format == "cat" and method.name == "linear" and not getattr(config, "normalize", True):
        raise ValidationFailed(
            "output.format: `cat` of a linear merge needs normalize (an unnormalized sum scales the base too)",
            param="output.format",
        )
    return CheckedRequest(
        request=request,
        method=method,
        config=config,
        inputs=tuple(inputs),
        positions=positions,
        input_parameters=input_parameters,
    )


def _check_mergekit_fields(request: MergeRequest) -> None:
    """mergekit fields that moerge reads but cannot honour in full: refused with the reason."""
    if request.slices is not None:
        raise ValidationFailed(
            "slices: layer slicing (passthrough and frankenmerges) is not supported; list whole models in models",
            param="slices",
        )
    if request.tokenizer_source not in (None, "base", request.base_model):
        raise ValidationFailed(
            f"tokenizer_source: {request.tokenizer_source!r} is not supported; the merged model keeps the "
            "base's tokenizer (tokenizer_source: base), as every input must share its vocabulary",
            param="tokenizer_source",
        )
    template = request.chat_template
    if template is not None and template != "auto" and "{{" not in template and "{%" not in template:
        raise ValidationFailed(
            f"chat_template: {template!r} is neither 'auto' (the base's) nor a Jinja template",
            param="chat_template",
        )


def _input_positions(request: MergeRequest, method: MergeMethod) -> tuple[int, ...]:
    """Which entries of ``models`` are inputs: all, but for task-vector methods not the base itself (as in
    mergekit, where configs list the base among the models; its task vector is zero and, counted, would only
    dilute a normalized mean)."""
    everything = tuple(range(len(request.models)))
    if not method.task_vectors or request.base_model is None:
        return everything
    others = tuple(i for i in everything if request.models[i].model != request.base_model)
    return others or everything  # only the base: let the method's own check say there is nothing to merge


def _split_parameters(params: dict[str, Any], method: MergeMethod) -> tuple[dict[str, Any], dict[str, Any]]:
    """Top-level ``parameters`` into the method's own and per-model defaults (``weight``, ``density``, ...),
    which mergekit also accepts at the top level."""
    global_names = {f.encode_name for f in msgspec.structs.fields(method.config_cls)}
    input_names = {f.encode_name for f in msgspec.structs.fields(method.input_cls)} - global_names
    defaults = {k: v for k, v in params.items() if k in input_names}
    return {k: v for k, v in params.items() if k not in defaults}, defaults


_INPUT_RE = re.compile(r"\binputs\[(\d+)\]")


def _renamed(exc: ValidationFailed, positions: tuple[int, ...]) -> ValidationFailed:
    """The methods' parameter paths in the request's own terms (``inputs[1].density`` ->
    ``models[<its entry>].parameters.density``, ``method`` -> ``merge_method``)."""

    def rename(text: str) -> str:
        text = _INPUT_RE.sub(lambda m: f"models[{positions[int(m.group(1))]}].parameters", text)
        if text == "method":
            return "merge_method"
        return re.sub(r"^inputs\b", "models", text)

    param, message = rename(exc.param or "body"), rename(exc.message)
    if not message.startswith(param):
        message = f"{param}: {message}"
    return ValidationFailed(message, param=param)
