"""Typed inputs of the registry, shared by the API, the CLI and the admin panel.

msgspec structs forbid unknown fields, so a misspelt field is an error that names it rather than a
silently ignored value.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from core.errors import ValidationFailed
from core.schemas import param_from_msgspec
from registry.chat_templates import CHAT_TEMPLATES
from registry.models import ExpertKind, ExpertStatus

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
SLUG_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 128 characters"

StrList = Annotated[list[str], msgspec.Meta(max_length=1000)]

# vLLM 0.32's tool-call parsers (``--tool-call-parser``; vllm/tool_parsers/__init__.py): what a served model's
# ``tool_parser`` may name. tests/unit/test_chat_templates.py checks each is registered in the installed vLLM.
TOOL_PARSERS = (
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4",
    "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4", "gigachat3", "glm45", "glm47", "granite",
    "granite-20b-fc", "granite4", "hermes", "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba",
    "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat",
    "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse_glimmer", "olmo3", "openai", "phi4_mini_json",
    "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss", "step3", "step3p5",
    "xlam",
)  # fmt: skip
# The settings a model served on its own (base, finetune, merged full model) has and an adapter takes from its base.
SERVING_FIELDS = ("chat_template", "tool_parser")


class ExpertSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a client declares when registering an expert; the rest is read from the files."""

    slug: str
    kind: str | None = None  # inferred: adapter_config.json -> adapter; `base` given -> finetune; else base
    base: str | None = None  # slug, alias or id of the base; adapters default to base_model_name_or_path
    version: int = 1
    description: str = ""
    task_description: str = ""
    skills: StrList = msgspec.field(default_factory=list)
    domains: StrList = msgspec.field(default_factory=list)
    example_prompts: StrList = msgspec.field(default_factory=list)
    tags: StrList = msgspec.field(default_factory=list)
    aliases: StrList = msgspec.field(default_factory=list)
    owner: str | None = None
    license: str | None = None
    datasets: StrList = msgspec.field(default_factory=list)
    source_uri: str | None = None
    base_revision: str | None = None
    # A model served on its own: a chat template shipped with moerge in place of its own (by name), and the vLLM
    # tool-call parser for its answers. An adapter is served with its base's: refused here (registry/services.py).
    chat_template: str | None = None
    tool_parser: str | None = None

    def validate(self) -> ExpertSpec:
        check_slug(self.slug, param="slug")
        check_serving_settings({"chat_template": self.chat_template, "tool_parser": self.tool_parser})
        for alias in self.aliases:
            check_slug(alias, param="aliases")
        if self.kind is not None and self.kind not in {k.value for k in ExpertKind}:
            raise ValidationFailed(
                f"unknown kind {self.kind!r}: one of {', '.join(k.value for k in ExpertKind)}", param="kind"
            )
        if self.version < 1:
            raise ValidationFailed("version must be a positive integer", param="version")
        return self


class ImportRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/experts/import: register a folder under one of the configured import roots."""

    path: str
    expert: ExpertSpec


class ExpertPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    description: str | None = None
    task_description: str | None = None
    skills: StrList | None = None
    domains: StrList | None = None
    tags: StrList | None = None
    aliases: StrList | None = None
    example_prompts: StrList | None = None
    owner: str | None = None
    license: str | None = None
    status: str | None = None
    # null sets it back to none (the model's own chat template; no tool parser)
    chat_template: str | msgspec.UnsetType | None = msgspec.UNSET
    tool_parser: str | msgspec.UnsetType | None = msgspec.UNSET

    def changes(self) -> dict[str, Any]:
        values = {
            f: getattr(self, f)
            for f in self.__struct_fields__
            if f not in SERVING_FIELDS and getattr(self, f) is not None
        }
        values.update({f: getattr(self, f) for f in SERVING_FIELDS if getattr(self, f) is not msgspec.UNSET})
        if not values:
            raise ValidationFailed("nothing to change: give at least one field", param="body")
        check_serving_settings({f: values[f] for f in SERVING_FIELDS if f in values})
        for alias in values.get("aliases", []):
            check_slug(alias, param="aliases")
        status = values.get("status")
        if status is not None and status not in {s.value for s in ExpertStatus}:
            raise ValidationFailed(
                f"unknown status {status!r}: one of {', '.join(s.value for s in ExpertStatus)}",
                param="status",
            )
        return values


class EvalIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    task: str
    metric: str
    value: float
    dataset: str | None = None
    split: str | None = None


def check_serving_settings(settings: dict[str, str | None]) -> None:
    """Refuse a ``chat_template`` that names no template moerge ships, or a ``tool_parser`` vLLM does not have."""
    for field, known in (("chat_template", CHAT_TEMPLATES), ("tool_parser", TOOL_PARSERS)):
        value = settings.get(field)
        if value is not None and value not in known:
            what = "a chat template shipped with moerge" if field == "chat_template" else "a vLLM tool-call parser"
            shown = value if len(value) <= 64 else value[:64] + "..."
            raise ValidationFailed(
                f"{field}: {shown!r} is not {what}; one of {', '.join(known)} (or null for none)", param=field
            )


def check_slug(value: str, *, param: str) -> None:
    if not SLUG_RE.match(value):
        raise ValidationFailed(f"{value!r} is not a valid name: {SLUG_RULE}", param=param)


def decode_strict(raw: bytes | str | dict[str, Any], typ: type[msgspec.Struct]) -> Any:
    """Decode JSON (or a parsed dict) into ``typ``; msgspec's errors become ValidationFailed."""
    try:
        if isinstance(raw, dict):
            return msgspec.convert(raw, typ)
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(str(exc), param=param_from_msgspec(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise ValidationFailed(f"body is not valid JSON: {exc}", param="body") from exc
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:  # msgspec's, for bad bytes inside a JSON string
        raise ValidationFailed(
            f"body is not valid UTF-8 ({exc.reason})", param="body", code="invalid_encoding"
        ) from None
