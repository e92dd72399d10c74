"""Text and YAML documents from strangers, decoded and parsed with bounds they cannot exceed.

One YAML loader for everything moerge parses from a caller: the merge configs of ``POST /api/merges`` and
the model card's front matter in an uploaded README.md. It refuses anchors and aliases before anything is
built, since a few hundred bytes of nested aliases ("billion laughs") expand into billions of nodes for
whoever walks the result (``_jsonable``, msgspec, the JSON encoder); it also caps the size, the nesting
depth (PyYAML's composer recurses) and the node count. Strict UTF-8 decoding lives here too, so a bad byte
is a 400 naming the field rather than a ``UnicodeDecodeError`` escaping as a 500.
"""

from __future__ import annotations

from typing import Any

import yaml

from core.errors import PayloadTooLarge, ValidationFailed

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "decode_utf8", "load_yaml"]

MAX_YAML_BYTES = 1024 * 1024  # a merge config or a card's front matter is a few KiB
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 200_000

# libyaml's parser when PyYAML was built with it (about 6x faster), PyYAML's own otherwise: same results.
_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STARTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_ENDS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def decode_utf8(raw: bytes, *, param: str, what: str) -> str:
    """``raw`` as text (a UTF-8 byte-order mark is dropped), or a 400 naming ``param`` and the bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})", param=param, code="invalid_encoding"
        ) from None


def load_yaml(source: str | bytes, *, param: str, what: str, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse one YAML document with PyYAML's safe constructors, after checking its event stream: at most
    ``max_bytes`` (UTF-8), no anchors or aliases, nesting at most ``MAX_YAML_DEPTH``, at most
    ``MAX_YAML_NODES`` nodes. Every refusal (and every YAML error) is a ValidationFailed naming ``param``."""
    text = decode_utf8(source, param=param, what=what) if isinstance(source, bytes) else source
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise PayloadTooLarge(f"{what} is {size} bytes of YAML; the limit is {max_bytes}", param=param)
    try:
        _check_events(text, param, what)
        return yaml.load(text, Loader=_LOADER)  # a SafeLoader (C or Python); its events were checked above
    except yaml.YAMLError as exc:
        raise ValidationFailed(f"{what} is not valid YAML ({exc})", param=param) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise ValidationFailed(f"{what} holds a value YAML cannot convert ({exc})", param=param) from None


def _check_events(text: str, param: str, what: str) -> None:
    """Walk the parser's events (no nodes are built) and refuse what could make loading or using the
    document expensive."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ValidationFailed(
                f"{what} uses YAML anchors or aliases (&name / *name), which are not accepted: write the values "
                "out in full",
                param=param,
                code="yaml_alias",
            )
        if isinstance(event, (yaml.ScalarEvent, *_STARTS)):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ValidationFailed(f"{what} has more than {MAX_YAML_NODES} YAML nodes", param=param)
        if isinstance(event, _STARTS):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValidationFailed(f"{what} nests deeper than {MAX_YAML_DEPTH} levels", param=param)
        elif isinstance(event, _ENDS):
            depth -= 1
