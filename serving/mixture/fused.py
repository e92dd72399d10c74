"""A routed mixture slot's per-token gating as one compiled loop, for moerge's vLLM CPU op.

In every LoRA layer of a decode step the op turns the router's scores into each token's top-k member weights and
scales the members' LoRA columns by them (``slot.gate_slot``). Written with torch ops that is about ten small ops
a layer call (abs, topk, a softmax, a scatter, a multiply), ~20-40 us of dispatch around a few hundred floats of
arithmetic, 120 times a step for SmolLM2. numba, which vLLM itself depends on, compiles the same work into one loop:
~6 us a layer call, the views around it included (measured at 16 tokens, q/k/v of a six-member slot).

Used for float32 CPU tensors when numba imports (it does wherever vLLM does); the torch ops of
``serving/mixture/scores.py`` stay the reference (the torch mixture layer runs them) and the fallback. Tests run the
op both ways against that reference.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

# How a slice's kept scores become weights.
ABS_SOFTMAX = 0  # Arrow: scores are the raw dot products; |dot| ranked, softmax with temperature over the kept
SOFTMAX = 1  # PHATGOOSE, or Arrow with a bias already added: softmax with temperature over the kept scores
SIGMOID = 2  # mixer: scores are logits; the kept ones' sigmoids are the weights, not renormalized

# False turns the compiled path off (the tests run the op both ways).
ENABLED = True


def _top_k_gate(
    product: Any,  # [tokens, columns] float32: the op's x Aᵀ, the slot's LoRA columns scaled in place
    start: int,  # where the slot's LoRA columns begin: slice s's column c is start + s * L + c
    scores: Any,  # [tokens, columns'] float32: member e's score in slice s is at score_start + s * n + e
    score_start: int,
    available: Any,  # [slices, n] bool: a member that does not adapt the slice's module is never kept
    member: Any,  # [L] int64: the member each of a slice's LoRA columns belongs to
    ks: Any,  # [slices] int64: members kept per token in each slice (0: none, every column zeroed)
    transform: int,
    inv_temperature: float,
) -> None:
    tokens = product.shape[0]
    slices, n = available.shape
    columns = member.shape[0]
    kept = np.empty(n, np.int64)
    top = np.empty(n, np.float32)
    gate = np.empty(n, np.float32)
    for t in range(tokens):
        for s in range(slices):
            k = ks[s]
            first_score = score_start + s * n
            for j in range(k):  # k passes of a selection: k is small, so is n
                best = -1
                best_score = np.float32(0.0)
                for e in range(n):
                    if not available[s, e]:
                        continue
                    taken = False
                    for q in range(j):
                        if kept[q] == e:
                            taken = True
                    if taken:
                        continue
                    score = scores[t, first_score + e]
                    if transform == ABS_SOFTMAX:
                        score = abs(score)
                    if best < 0 or score > best_score:
                        best, best_score = e, score
                kept[j] = best
                top[j] = best_score
            gate[:] = 0.0
            if transform == SIGMOID:
                for j in range(k):
                    gate[kept[j]] = 1.0 / (1.0 + math.exp(-top[j]))
            elif k:
                total = 0.0
                largest = top[0]  # every exponent <= 0
                for j in range(k):
                    top[j] = math.exp((top[j] - largest) * inv_temperature)
                    total += top[j]
                for j in range(k):
                    gate[kept[j]] = top[j] / total
            first_column = start + s * columns
            for c in range(columns):
                product[t, first_column + c] *= gate[member[c]]


@functools.cache
def _compiled() -> Callable[..., None] | None:
    try:
        import numba
    except ImportError:
        log.info("numba is not installed: mixture slots are gated with torch ops")
        return None
    try:  # cached beside this file or in the user's cache folder: later processes skip the ~1 s compile
        return numba.njit(cache=True, nogil=True)(_top_k_gate)  # type: ignore[no-any-return]
    except RuntimeError:  # no writable place for numba's cache: compile in every process
        return numba.njit(nogil=True)(_top_k_gate)  # type: ignore[no-any-return]


def available() -> bool:
    """Whether :func:`top_k_gate_` runs compiled (numba imports, and the path is on)."""
    return ENABLED and _compiled() is not None


def top_k_gate_(
    product: torch.Tensor,
    start: int,
    scores: torch.Tensor,
    score_start: int,
    plan: GatePlan,
    transform: int,
    temperature: float = 1.0,
) -> None:
    """Scale a slot's LoRA columns of ``product`` [tokens, columns] (from ``start``, slice after slice) in place by
    each token's weight for each column's member: per token and slice the top ``ks[s]`` available members by
    ``scores`` (member e of slice s at column ``score_start + s * n + e``), weighted as ``transform`` says; the
    other members' columns become 0. float32 CPU tensors; call only when :func:`available`."""
    kernel = _compiled()
    assert kernel is not None  # the caller asked available()
    product_array = product.numpy()
    scores_array = product_array if scores is product else scores.numpy()
    kernel(
        product_array,
        start,
        scores_array,
        score_start,
        plan.available,
        plan.member,
        plan.ks,
        transform,
        1.0 / temperature,
    )


class GatePlan(NamedTuple):
    """A slot's fixed arrays for the compiled gating (made once per slot layout, :func:`gate_plan`)."""

    available: np.ndarray  # [slices, n] bool
    member: np.ndarray  # [L] int64
    ks: np.ndarray  # [slices] int64


def gate_plan(available_members: torch.Tensor, member: torch.Tensor, ks: Sequence[int]) -> GatePlan:
    return GatePlan(
        available_members.numpy().copy(), member.to(torch.int64).numpy().copy(), np.asarray(ks, dtype=np.int64)
    )
