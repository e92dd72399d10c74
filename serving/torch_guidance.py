"""JSON answers and tool calls in the torch engine: xgrammar masks, as vLLM's structured outputs decode them.

A request's ``Guidance`` becomes one JSON Schema (``constraint``): ``response_format`` ``json_object`` any JSON
object, ``json_schema`` its schema; tools with ``tool_choice`` ``required`` a JSON array of one or more
``{"name", "parameters"}`` calls of the tools (at most one when ``parallel_tool_calls`` is false), a named function
that function's parameters object: the shapes vLLM 0.32 constrains those cases to (``tool_parsers/utils.py``), so
both engines answer alike. ``tool_choice`` ``auto`` needs a model-specific parser of free text (vLLM's tool-call
parsers), which this engine has not: it is refused.

Each loaded model gets one ``Grammars`` (the tokenizer's vocabulary as xgrammar sees it, a compiler and a small
cache of compiled schemas). Every row of a batch that decodes under a schema has its own ``GrammarMatcher``; the
``GrammarMask`` logits processor leaves open only the tokens its matcher allows before anything samples, and the
engine's tracker advances the matcher with each chosen token. Whitespace between JSON tokens is not free (compact
JSON with ``", "`` and ``": "``): small models left free to write whitespace often write nothing else, and vLLM
offers the same choice (``disable_any_whitespace``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from core.errors import ValidationFailed
from serving.engine import Guidance

log = logging.getLogger(__name__)

CACHE_SIZE = 32  # compiled schemas kept per loaded model
METASPACE = "\u2581"  # SentencePiece's space marker
_SOURCE = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # xgrammar's "[time] file.cc:line: " before its reason


@dataclass(frozen=True)
class Constraint:
    """What one request's answer must be: a JSON Schema (its JSON text) and how the answer is read."""

    schema: str  # compact JSON, in the order the caller wrote it
    param: str  # the request field a grammar that cannot compile is blamed on
    tools: str | None = None  # "required" (a list of calls) or "named" (one function's arguments)
    function: str = ""  # the named function


def constraint(guidance: Guidance | None) -> Constraint | None:
    """The schema ``guidance`` decodes under (None: free text); ValidationFailed for what this engine cannot do."""
    if guidance is None:
        return None
    if guidance.calls_tools:
        choice = guidance.tool_choice
        if choice in (None, "auto"):
            raise ValidationFailed(
                "tool_choice 'auto' needs a vLLM tool-call parser to find the calls in free text; the torch engine "
                "decodes tool calls only with tool_choice 'required' or a named function",
                param="tool_choice",
            )
        functions = {t["function"]["name"]: t["function"].get("parameters") or None for t in guidance.tools}
        if isinstance(choice, dict):
            name = str(choice["function"]["name"])
            if name not in functions:
                raise ValidationFailed(f"names no tool of this request: {name!r}", param="tool_choice")
            return Constraint(_canonical(_object_schema(functions[name])), "tools", "named", name)
        calls: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "anyOf": [
                    {
                        "properties": {
                            "name": {"type": "string", "enum": [name]},
                            "parameters": _object_schema(params),
                        },
                        "required": ["name", "parameters"],
                    }
                    for name, params in functions.items()
                ],
            },
        }
        if guidance.parallel_tool_calls is False:
            calls["maxItems"] = 1
        return Constraint(_canonical(calls), "tools", "required")
    form = guidance.response_format or {}
    if form.get("type") == "json_object":
        return Constraint(_canonical({"type": "object"}), "response_format")
    if form.get("type") == "json_schema":
        return Constraint(_canonical(form["json_schema"]["schema"]), "response_format")
    return None


def _object_schema(params: dict[str, Any] | None) -> dict[str, Any]:
    # missing or empty parameters still make the arguments a JSON object (vLLM's rule)
    return params if params else {"type": "object", "properties": {}}


def _canonical(schema: Any) -> str:
    # keys keep their order: a schema's properties are written in the order it declares them
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


# --- per loaded model -------------------------------------------------------------------------------------


class Grammars:
    """The tokenizer as xgrammar sees it, a compiler and the last ``CACHE_SIZE`` compiled schemas of one model."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_ids)
        if info.vocab_type == xgr.VocabType.RAW and _metaspace(tokenizer):
            info = _spelled_out(tokenizer, vocab_size, self.stop_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: Constraint) -> xgr.GrammarMatcher:
        """A fresh matcher (one per answer) for ``spec``; ValidationFailed when its schema does not compile."""
        with self._lock:
            compiled = self._cache.get(spec.schema)
            if compiled is not None:
                self._cache.move_to_end(spec.schema)
            else:
                try:
                    compiled = self.compiler.compile_json_schema(spec.schema, any_whitespace=False)
                except Exception as exc:  # xgrammar says what it cannot take (a RuntimeError with its reason)
                    lines = str(exc).strip().splitlines()
                    reason = _SOURCE.sub("", lines[-1]) if lines else type(exc).__name__
                    raise ValidationFailed(
                        f"the JSON Schema cannot be decoded under: {reason[:300]}", param=spec.param
                    ) from None
                self._cache[spec.schema] = compiled
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return xgr.GrammarMatcher(compiled)


def _metaspace(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        return backend is not None and '"Metaspace"' in backend.to_str()
    except Exception:  # pragma: no cover - a backend that cannot serialize itself
        return False


def _spelled_out(tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> xgr.TokenizerInfo:
    """A SentencePiece-style vocabulary without byte pieces, which xgrammar takes for raw text: each token as the
    text it stands for (its space marker a space), special tokens as nothing (never allowed inside JSON)."""
    vocab = [""] * vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for piece, idx in tokenizer.get_vocab().items():
        if idx < vocab_size and idx not in special:
            vocab[idx] = piece.replace(METASPACE, " ")
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_ids)


# --- decoding -------------------------------------------------------------------------------------------


class GuidedRow(Protocol):
    """What the mask reads of the engine's rows: the row's matcher (None: free) and whether it has ended."""

    matcher: xgr.GrammarMatcher | None
    reason: str | None


class GrammarMask(LogitsProcessor):
    """Leaves open, on each guided row still decoding, only the tokens its grammar allows next."""

    def __init__(self, rows: Sequence[GuidedRow], vocab_size: int) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        live = []
        for i, row in enumerate(self.rows):
            matcher = row.matcher
            if matcher is not None and row.reason is None and not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, i)
                live.append(i)
        if live:
            vocab = min(self.vocab_size, scores.shape[-1])
            xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), vocab_size=vocab, indices=live)
        return scores


def advance(matcher: xgr.GrammarMatcher, token: int) -> None:
    """The row chose ``token``: the grammar moves on (a token the mask let through is always accepted)."""
    if not matcher.is_terminated() and not matcher.accept_token(token):  # pragma: no cover - the mask forbids it
        log.warning("torch engine: token %d not accepted by its grammar", token)


# --- answers ----------------------------------------------------------------------------------------------


def tool_calls(spec: Constraint, text: str) -> tuple[dict[str, Any], ...]:
    """The calls in a guided answer, OpenAI-shaped; none when the answer is no complete call (cut by max_tokens).
    A named function's arguments are the answer as written; ``required`` calls are parsed, as vLLM does."""
    if spec.tools == "named":
        return (_call(spec.function, text),) if text.strip() else ()
    try:
        parsed = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(parsed, list):
        return ()
    calls = []
    for item in parsed:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or "parameters" not in item:
            return ()
        calls.append(_call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
    return tuple(calls)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def finish_reason(spec: Constraint, reason: str) -> str:
    """vLLM's: ``tool_calls`` for required calls that ended by themselves; a named call keeps its own reason."""
    return "tool_calls" if spec.tools == "required" and reason == "stop" else reason
