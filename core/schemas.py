"""Typed input shared by every layer: msgspec's validation errors turned into ValidationFailed naming the field."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from core.errors import ValidationFailed

_AT_RE = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]+)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def param_from_msgspec(message: str) -> str:
    """The field a msgspec ValidationError message is about (``a.b``, ``items[2].c``); ``body`` for the whole."""
    prefix = ""
    if at := _AT_RE.search(message):
        prefix = at.group(1)
    for pattern in (_UNKNOWN_RE, _MISSING_RE):
        if found := pattern.search(message):
            return f"{prefix}.{found.group(1)}" if prefix else found.group(1)
    return prefix or "body"


def convert_params(params: Any, typ: type[msgspec.Struct], field_name: str) -> Any:
    """Parameters of a pluggable method (router, aggregator, merge method) into its typed config; an
    error names ``<field_name>.<parameter>``."""
    try:
        return msgspec.convert(params, typ)
    except msgspec.ValidationError as exc:
        inner = param_from_msgspec(str(exc))
        param = field_name if inner == "body" else f"{field_name}.{inner}"
        raise ValidationFailed(f"{field_name}: {exc}", param=param) from exc
