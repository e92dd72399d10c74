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
from registry.models import ExpertKind, ExpertStatus

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
SLUG_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 128 characters"

StrList = Annotated[list[str], msgspec.Meta(max_length=1000)]


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

    def validate(self) -> ExpertSpec:
        check_slug(self.slug, param="slug")
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

    def changes(self) -> dict[str, Any]:
        values = {f: getattr(self, f) for f in self.__struct_fields__ if getattr(self, f) is not None}
        if not values:
            raise ValidationFailed("nothing to change: give at least one field", param="body")
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
