"""LoRA rules every layer shares: the ranks vLLM serves, the largest rank an adapter declares, and how PEFT
names a LoRA's tensors and matches its ``rank_pattern`` / ``alpha_pattern`` keys to modules."""

from __future__ import annotations

import re
from typing import Any

# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks in 0.32.0). Hard-coded
# so the API process does not import vllm (and torch) just to validate a number.
VALID_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_for(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= ``rank``."""
    for valid in VALID_LORA_RANKS:
        if valid >= rank:
            return valid
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VALID_LORA_RANKS[-1]})")


def largest_rank(r: object, rank_pattern: object) -> int:
    """The largest of ``r`` and the rank_pattern values that are integers (0 if none)."""
    values = [r, *(rank_pattern.values() if isinstance(rank_pattern, dict) else ())]
    return max((v for v in values if isinstance(v, int) and not isinstance(v, bool)), default=0)


# PEFT saves LoRA keys relative to the PeftModel: the base model's own names follow this prefix.
PEFT_PREFIX = "base_model.model."

MAX_PATTERN_KEY_CHARS = 200
# ASCII only: \w would admit every Unicode letter. Run only on keys already known to be short.
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]+")


def is_pattern_key(key: object) -> bool:
    """A module name: letters, digits, ``_`` and ``.``, 1 to 200 characters (length checked before matching)."""
    return isinstance(key, str) and 0 < len(key) <= MAX_PATTERN_KEY_CHARS and _PATTERN_KEY.fullmatch(key) is not None


def _key_matches(key: str, text: str, *, newlines: bool) -> bool:
    """``re.fullmatch(key, text)`` for a module-name key, whose only metacharacter is ``.`` (any character
    but a newline)."""
    if "." not in key:
        return key == text
    return len(key) == len(text) and all(
        k == c or (k == "." and not (newlines and c == "\n")) for k, c in zip(key, text, strict=True)
    )


def pattern_value(pattern: dict[str, Any], module: str) -> Any:
    """The value of the first ``rank_pattern`` / ``alpha_pattern`` key that matches ``module``, by PEFT's rule:
    ``re.fullmatch(rf"(.*[.])?(?:{key})", module)``, a suffix match on the module path.

    Computed without a regex in time linear in the key, so a long module name cannot make it slow. Keys that
    are not module names (an older row: registration refuses them, registry/limits.py) are matched as plain
    text, never run as patterns."""
    newlines = "\n" in module  # `.` and `.*` stop at a newline; only then is it worth checking for one
    for key, value in pattern.items():
        if not is_pattern_key(key):
            if module == key or module.endswith("." + key):
                return value
            continue
        n = len(key)
        if len(module) < n or (len(module) > n and module[-n - 1] != "."):
            continue
        if newlines and "\n" in module[: max(len(module) - n - 1, 0)]:
            continue
        if _key_matches(key, module[len(module) - n :], newlines=newlines):
            return value
    return None
