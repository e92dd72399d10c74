"""A merge request: what to merge, how, and what to write, as JSON or a mergekit-style YAML.

The fields are mergekit's (``merge_method``, ``base_model``, ``models[].model`` / ``.parameters``,
``parameters``, ``dtype``) so its YAML files import as they are; ``model`` and ``base_model`` name
registered experts (slug, alias or id). moerge adds ``name`` (the result's slug), ``output`` (a full model,
a LoRA by truncated SVD, or a LoRA by concatenation), ``seed`` (DARE) and ``description``. Checks that need
no files happen here; the plan (``merging/plan.py``) checks the inputs against each other.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec
import yaml

from merging.methods import METHODS, InputParams, MergeMethod, MethodConfig
from registry.errors import ValidationFailed
from registry.schemas import check_slug, decode_strict
from serving.vllm_process import VALID_LORA_RANKS  # a merged LoRA must fit vLLM's --max-lora-rank

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
    dtype: str | None = None  # of the output; default the base's (or the first input's)
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

    @property
    def output(self) -> OutputSpec:
        return self.request.output


def parse_request(raw: bytes | str | dict[str, Any], *, yaml_text: bool = False) -> MergeRequest:
    """Decode JSON (or a parsed dict), or YAML with ``yaml_text``; errors name the field."""
    if yaml_text:
        try:
            loaded = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValidationFailed(f"body is not valid YAML: {exc}", param="body") from exc
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
    if request.dtype is not None and request.dtype not in DTYPES:
        raise ValidationFailed(f"dtype: {request.dtype!r} is not one of {', '.join(DTYPES)}", param="dtype")
    try:
        method = METHODS.get(request.merge_method)
        config, inputs = METHODS.configure(
            request.merge_method, request.parameters, [m.parameters for m in request.models]
        )
    except ValidationFailed as exc:
        param, message = _rename(exc.param or "body"), _rename(exc.message)
        if not message.startswith(param):
            message = f"{param}: {message}"
        raise ValidationFailed(message, param=param) from exc
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
    return CheckedRequest(request=request, method=method, config=config, inputs=tuple(inputs))


_INPUT_RE = re.compile(r"\binputs\[(\d+)\]")


def _rename(text: str) -> str:
    """The methods' parameter paths in the request's own terms (``inputs[1].density`` ->
    ``models[1].parameters.density``, ``method`` -> ``merge_method``)."""
    text = _INPUT_RE.sub(r"models[\1].parameters", text)
    if text == "method":
        return "merge_method"
    return re.sub(r"^inputs\b", "models", text)
