"""What a LoRA adapter may declare so that nothing registered can stop, stall or brick a server.

One set of rules serves three places: registration refuses an adapter that breaks them (a 400 naming the
``adapter_config.json`` field), ``moerge expert verify`` and the health endpoint's admin view report rows that
break them (an older database, a lowered ``MOERGE_MAX_LORA_RANK``), and serving refuses such a row per request
with the fix, never at start-up.

``rank_pattern`` / ``alpha_pattern`` keys are regular expressions to PEFT and vLLM, which run them through
Python's ``re`` against every module name when they load the adapter: a key such as ``(a+)+b`` backtracks for
seconds holding the GIL. Keys are therefore restricted to module names (letters, digits, ``_`` and ``.``), in
which no regex can backtrack, before anything runs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.lora import MAX_PATTERN_KEY_CHARS, is_pattern_key, largest_rank
from core.settings import MAX_LORA_RANK
from registry.models import Expert

__all__ = [
    "MAX_LORA_RANK",
    "MAX_PATTERN_KEYS",
    "MAX_PATTERN_KEY_CHARS",
    "LoraFault",
    "first_lora_fault",
    "is_pattern_key",
    "largest_rank",
    "lora_faults",
    "row_fault",
    "unservable_adapters",
    "unservable_message",
]

MAX_PATTERN_KEYS = 1000


@dataclass(frozen=True)
class LoraFault:
    """One broken rule: the adapter_config.json field (``r``, ``rank_pattern.<key>``, ...) and why."""

    field: str
    reason: str
    rank: int | None = None  # set when the fault is a rank above the limit: the fix differs

    def fix(self, max_lora_rank: int) -> str:
        if self.rank is not None:
            raise_it = (
                f"raise MOERGE_MAX_LORA_RANK to {self.rank} or more"
                if self.rank <= MAX_LORA_RANK
                else f"raise MOERGE_MAX_LORA_RANK (the torch engine only: vLLM serves ranks up to {MAX_LORA_RANK})"
            )
            return f"re-register it with r and every rank_pattern value <= {max_lora_rank}, or {raise_it}"
        return f"re-register it with a corrected adapter_config.json ({self.field})"


def _is_alpha(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _show(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _rank_faults(field: str, value: object, max_lora_rank: int) -> Iterator[LoraFault]:
    # bool is an int subclass in Python but never a rank.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        if value > max_lora_rank:
            yield LoraFault(
                field,
                f"{field} is {value}, above the largest LoRA rank served here (MOERGE_MAX_LORA_RANK={max_lora_rank})",
                rank=value,
            )
        return
    yield LoraFault(field, f"{field} must be a positive integer, got {_show(value)}")


def _pattern_faults(name: str, pattern: object, check_value: Any) -> Iterator[LoraFault]:
    if not isinstance(pattern, dict):
        yield LoraFault(name, f"{name} must be an object mapping module names to values")
        return
    if len(pattern) > MAX_PATTERN_KEYS:
        yield LoraFault(name, f"{name} has {len(pattern)} keys, more than {MAX_PATTERN_KEYS}")
        return
    # Every key is checked before any value: nothing later may run a key that is not a module name.
    for key in pattern:
        if not is_pattern_key(key):
            yield LoraFault(
                name,
                f"{name} key {_show(key)} is not a module name (letters, digits, _ and . only, "
                f"at most {MAX_PATTERN_KEY_CHARS} characters)",
            )
            return
    for key, value in pattern.items():
        yield from check_value(f"{name}.{key}", value)


def lora_faults(
    *, r: object, lora_alpha: object, rank_pattern: object, alpha_pattern: object, max_lora_rank: int
) -> Iterator[LoraFault]:
    """Every broken rule of a LoRA's declared ranks and alphas, in field order (``None`` alphas and patterns
    mean PEFT's defaults)."""
    yield from _rank_faults("r", r, max_lora_rank)
    if lora_alpha is not None and not _is_alpha(lora_alpha):
        yield LoraFault("lora_alpha", f"lora_alpha must be a finite positive number, got {_show(lora_alpha)}")

    def alpha_value(field: str, value: object) -> Iterator[LoraFault]:
        if not _is_alpha(value):
            yield LoraFault(field, f"{field} must be a finite positive number, got {_show(value)}")

    yield from _pattern_faults(
        "rank_pattern", {} if rank_pattern is None else rank_pattern, lambda f, v: _rank_faults(f, v, max_lora_rank)
    )
    yield from _pattern_faults("alpha_pattern", {} if alpha_pattern is None else alpha_pattern, alpha_value)


def first_lora_fault(
    *, r: object, lora_alpha: object, rank_pattern: object, alpha_pattern: object, max_lora_rank: int
) -> LoraFault | None:
    return next(
        lora_faults(
            r=r,
            lora_alpha=lora_alpha,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            max_lora_rank=max_lora_rank,
        ),
        None,
    )


def row_fault(expert: Any, max_lora_rank: int) -> LoraFault | None:
    """Why a registered LoRA row (an Expert, or any object with its LoRA columns) cannot be served; ``None``
    for a servable row or one that is not a LoRA."""
    if not getattr(expert, "peft_type", None):
        return None
    return first_lora_fault(
        r=expert.r,
        lora_alpha=expert.lora_alpha,
        rank_pattern=expert.rank_pattern,
        alpha_pattern=expert.alpha_pattern,
        max_lora_rank=max_lora_rank,
    )


def unservable_message(slug: str, fault: LoraFault, max_lora_rank: int) -> str:
    return f"adapter {slug!r} cannot be served: {fault.reason}: {fault.fix(max_lora_rank)}"


async def unservable_adapters(session: AsyncSession, max_lora_rank: int) -> list[dict[str, str]]:
    """Registered LoRA rows that cannot be served, by slug: each ``{"slug", "id", "reason", "fix"}``.

    For ``moerge expert verify`` and the health endpoint's admin view; serving refuses them per request."""
    rows = await session.execute(
        select(
            Expert.slug,
            Expert.id,
            Expert.peft_type,
            Expert.r,
            Expert.lora_alpha,
            Expert.rank_pattern,
            Expert.alpha_pattern,
        )
        .where(Expert.peft_type.is_not(None))
        .order_by(Expert.slug)
    )
    out: list[dict[str, str]] = []
    for row in rows:
        fault = row_fault(row, max_lora_rank)
        if fault is not None:
            out.append({"slug": row.slug, "id": str(row.id), "reason": fault.reason, "fix": fault.fix(max_lora_rank)})
    return out
