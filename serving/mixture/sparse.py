"""Routed mixture of stacked LoRA adapters, pure tensor code (no transformers, no PEFT).

delta(x_t) = Σ_{e in chosen(t)} c_{t,e} · scale_e · B_e A_e x_t, computed with sparse dispatch: only the
chosen (token, expert) pairs are computed, never a dense pass over all experts. Inputs are flat [tokens, in],
so a batch of sequences with different routes is one call (the layout vLLM hands its linear layers).

``project_down`` / ``project_up`` are what MixtureLinear runs (see below: the A side shared by the modules of
one input, gathered per pair for few tokens, segment matmuls for many); ``sparse_lora_delta`` is the plain
one-module form (pairs sorted by expert, one matmul pair per chosen expert) and ``dense_lora_delta`` the
reference tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

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


# -- the fast path MixtureLinear runs: the A side shared by the modules of one input, the B side per module --
#
# Modules that read the same input (q, k and v; gate and up) keep their own prototypes and their own routes,
# but their A stacks are concatenated into one [M*E, r, in] tensor (module j's expert e at row j*E + e), so
# the A side of all of them is one gather and one batched matmul. Each module then adds its B side into its
# base output in place. Two layouts, both computing only the chosen (token, expert) pairs:
#   gathered (few tokens, decode): each pair's A and B are gathered and multiplied in a batched matmul; no
#     sort, no host sync, a constant number of ops whatever the number of experts;
#   grouped (many tokens, prefill): pairs sorted by (module, expert) and one segmented matmul over the
#     sorted rows, so each expert's weights are read once instead of once per token.

GATHER_MAX_TOKENS = 32
"""Up to this many tokens per call the gathered layout runs; above it, the grouped one."""


class LowRank(NamedTuple):
    """The A side of a routed mixture for the M modules sharing one input ``x`` [T, in].

    gathered: ``z`` [T, M, k, r], the chosen experts' A x already scaled by c_e·scale_e.
    grouped: ``z`` [M*T*k, r] in (module, expert) order, ``token_of`` [M*T*k] the token of each row and
    ``offs`` [M*E] (int32) the cumulative row counts of the (module, expert) segments.
    """

    z: torch.Tensor
    experts: torch.Tensor  # [T, M, k]
    token_of: torch.Tensor | None = None
    offs: torch.Tensor | None = None


def segment_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[g-1]:offs[g]`` of ``a`` [P, K] times ``b[g]`` [K, N], for every group g: [P, N]."""
    if _HAS_GROUPED_MM and _grouped_mm_fits(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    # One split and one unbind give every group's views in two ops (slicing per group cost more than its mm).
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    out = a.new_empty(a.shape[0], b.shape[2])
    for rows, dest, weight, n in zip(a.split(counts), out.split(counts), b.unbind(0), counts, strict=True):
        if n:
            torch.mm(rows, weight, out=dest)
    return out


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm takes float32 / bfloat16 / float16 only, and every stride a multiple of 16 bytes: K and
    N rows of whole 16-byte blocks."""
    if a.dtype not in _GROUPED_MM_DTYPES or b.dtype != a.dtype or a.shape[0] == 0:
        return False
    block = 16 // a.element_size()
    return a.shape[1] % block == 0 and b.shape[2] % block == 0


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_works() -> bool:
    """CPU builds of torch have had it since 2.9; it runs every group's matmul in one call (30-50% faster
    than a Python loop of mm at the mixture's sizes here). Probed once, on shapes it accepts."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a, b = torch.ones(3, 4), torch.ones(3, 4, 4)
        out = torch._grouped_mm(a, b, offs=torch.tensor([1, 1, 3], dtype=torch.int32))
        return bool(out.shape == (3, 4) and torch.equal(out, torch.full((3, 4), 4.0)))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_HAS_GROUPED_MM = _grouped_mm_works()


def project_down(
    x: torch.Tensor,
    A: torch.Tensor,
    scale: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    *,
    grouped: bool | None = None,
) -> LowRank:
    """A side of M modules sharing ``x`` [T, in]: A [M*E, r, in] and ``scale`` [M*E] concatenate the
    modules' stacks, ``experts`` / ``weights`` [T, M, k] are each module's route (indices into its own E).
    ``grouped`` picks the layout (default: by the number of tokens)."""
    T, M, k = experts.shape
    E = A.shape[0] // M
    offset = torch.arange(0, M * E, E, device=experts.device).view(1, M, 1)
    rows = experts + offset  # [T, M, k] rows of the concatenated stack
    coef = weights.to(x.dtype) * scale.index_select(0, rows.view(-1)).view(T, M, k)
    if grouped is None:
        grouped = T > GATHER_MAX_TOKENS
    if not grouped:
        r = A.shape[1]
        Ag = A.index_select(0, rows.view(-1)).view(T, M * k * r, -1)  # index_select: a row copy per pair
        # One token: matrix-vector; more: row vector times matrix (bmm with one column is slow here).
        z = torch.bmm(Ag, x.unsqueeze(-1)) if T == 1 else torch.bmm(x.unsqueeze(1), Ag.transpose(1, 2))
        return LowRank(z.view(T, M, k, r) * coef.unsqueeze(-1), experts)
    # (module, expert) order: module j's T*k rows come j-th, so each module's segment is known without a sync.
    flat = rows.transpose(0, 1).reshape(-1)  # [M*T*k], module-major
    order = torch.argsort(flat, stable=True)
    token_of = (order % (T * k)) // k
    counts = torch.bincount(flat, minlength=M * E)
    offs = counts.cumsum(0).to(torch.int32)
    z = segment_mm(x.index_select(0, token_of), A.transpose(1, 2), offs)
    z = z * coef.transpose(0, 1).reshape(-1)[order].unsqueeze(-1)
    return LowRank(z, experts, token_of, offs)


def project_up(low: LowRank, member: int, Bt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add module ``member``'s mixture delta into ``out`` [T, out] in place and return it; ``Bt`` [E, r, out]
    is that module's B stack transposed."""
    T, _, k = low.experts.shape
    E, r, d_out = Bt.shape
    if low.offs is None:  # gathered
        Bg = Bt.index_select(0, low.experts[:, member].reshape(-1)).view(T, k * r, d_out)
        return out.view(T, 1, d_out).baddbmm_(low.z[:, member].reshape(T, 1, k * r), Bg).view(T, d_out)
    assert low.token_of is not None
    seg = slice(member * T * k, (member + 1) * T * k)
    offs = low.offs[member * E : (member + 1) * E] - member * T * k
    return out.index_add_(0, low.token_of[seg], segment_mm(low.z[seg], Bt, offs))
