"""Routed mixture of stacked LoRA adapters, pure tensor code (no transformers, no PEFT).

delta(x_t) = Σ_{e in chosen(t)} c_{t,e} · scale_e · B_e A_e x_t, computed with sparse dispatch: the
(token, expert) pairs are sorted by expert and each chosen expert runs one pair of matmuls on its own
tokens only (a single token, as in decoding with batch 1, skips the sort). Inputs are flat
[tokens, in], so a batch of sequences with different routes is one call (the layout vLLM hands its
linear layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_path(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B A x for the rows of ``x`` [n, in], A [r, in], B [out, r]: one expert's LoRA path."""
    return (x @ A.T) @ B.T


def sparse_lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    ranks: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mixture delta [tokens, out] for ``x`` [tokens, in] with A [E, r, in], B [E, out, r], scale [E],
    ``experts`` / ``weights`` [tokens, k]. Only experts that some token chose are computed; ``ranks`` (true
    rank per expert) skips the zero padding of lower-rank adapters."""
    tokens, k = experts.shape
    if tokens == 1 and k > 0:
        return _one_token_delta(x, A, B, scale, ranks, experts[0], weights[0])
    out = x.new_zeros(tokens, B.shape[1])
    if tokens == 0 or k == 0:
        return out
    flat = experts.reshape(-1)
    # Stable sort keeps each expert's tokens in order, so index_add_ sums in a deterministic order.
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    token_of = order // k
    coef = weights.reshape(-1)[order].to(x.dtype) * scale.to(x.dtype)[sorted_experts]
    chosen, counts = torch.unique_consecutive(sorted_experts, return_counts=True)
    start = 0
    for e, n in zip(chosen.tolist(), counts.tolist(), strict=True):
        idx = token_of[start : start + n]
        r = A.shape[1] if ranks is None else ranks[e]
        y = lora_path(x.index_select(0, idx), A[e, :r], B[e, :, :r])
        out.index_add_(0, idx, y * coef[start : start + n, None])
        start += n
    return out


def _one_token_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    ranks: Sequence[int] | None,
    experts: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Decode with batch 1: no sort, no gather, just k matrix-vector pairs on views of the stacks; eager
    per-op overhead dominates at this size, so fewer ops is what makes it fast."""
    x0 = x[0]
    coef = (weights.to(x.dtype) * scale.to(x.dtype)[experts]).tolist()
    y = x.new_zeros(B.shape[1])
    for e, c in zip(experts.tolist(), coef, strict=True):
        r = A.shape[1] if ranks is None else ranks[e]
        y.add_(lora_path(x0, A[e, :r], B[e, :, :r]), alpha=c)
    return y.unsqueeze(0)


def dense_lora_delta(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Reference: every expert on every token, then masked to the chosen ones (tests and benchmarks only;
    the route comes first here, the stacks after)."""
    all_paths = torch.einsum("eor,eri,ti->teo", B, A, x) * scale[None, :, None]  # [tokens, E, out]
    coeff = x.new_zeros(x.shape[0], A.shape[0])
    coeff.scatter_add_(1, experts, weights.to(x.dtype))
    return torch.einsum("te,teo->to", coeff, all_paths)
