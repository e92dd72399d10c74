"""Chat templates shipped with moerge, by name: what a base model's ``chat_template`` setting may name.

A base (or a full model served on its own) is served with its own tokenizer's chat template unless the registry
names one of these in its place: e.g. ``smollm2-tools``, SmolLM2-Instruct's ChatML with function calling in the
Hermes layout (tools in the system turn, ``<tool_call>`` blocks that vLLM's ``hermes`` tool parser reads back).
Callers choose a name, never Jinja text: a template runs inside the server that renders it.

Each template is the file ``<name>.jinja`` beside this module (package data).
"""

from __future__ import annotations

import functools
from importlib import resources

_SUFFIX = ".jinja"


def _names() -> tuple[str, ...]:
    folder = resources.files(__name__)
    return tuple(sorted(p.name[: -len(_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SUFFIX)))


CHAT_TEMPLATES: tuple[str, ...] = _names()


@functools.cache
def chat_template_text(name: str) -> str:
    """The Jinja text of the shipped template ``name``; KeyError if moerge ships none of that name."""
    if name not in CHAT_TEMPLATES:
        raise KeyError(name)
    return resources.files(__name__).joinpath(name + _SUFFIX).read_text(encoding="utf-8")
