"""LoRA rank rules every layer shares: the ranks vLLM serves, and the largest rank an adapter declares."""

from __future__ import annotations

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
