"""Generalized task arithmetic: one function behind task_arithmetic, ties, breadcrumbs(_ties), dare_*.

For task vectors δ_i = W_i − W_0 with weights w_i (the structure of mergekit 0.1.5's
``mergekit/merge_methods/generalized_task_arithmetic.py``, the math re-derived here):

1. sparsify each δ_i (none | magnitude | random (DARE) | magnitude_outliers (breadcrumbs)), with
   ``rescale`` applied by the sparsifier (see ``sparsify.py``);
2. weight: d_i = w_i·δ_i (before the sign election, so a negative weight flips an input's vote);
3. with sign consensus ("sum", TIES' elect): the elected sign per entry is + where Σ_i d_i ≥ 0, else −;
   M_i = [sign(d_i) = elected] (a zero entry never agrees); τ = Σ M_i·d_i, divisor Σ M_i·w_i with an
   exact 0 replaced by 1 (the disjoint mean when normalized);
   without: τ = Σ d_i, divisor Σ w_i with |divisor| < 1e-8 replaced by 1;
4. ``normalize``: τ /= divisor; then τ *= ``lambda``. The executor writes W_0 + τ.

Defaults per method are mergekit 0.1.5's (``mergekit/merge_methods/registry.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import msgspec
import torch

from merging.methods.base import ZERO_SUM, InputParams, MergeFn, MethodConfig, refuse_zero_weight_sum, require_param
from merging.methods.sparsify import Kept, Sparsification, kept

Consensus = Literal["sum"]


class TaskArithmeticConfig(MethodConfig, frozen=True):
    """Global parameters of every task-vector method.

    normalize: divide the weighted sum of the task vectors by the sum of the weights.
    lambda: scales the merged task vector before it is added to the base (finite).
    int8_mask: accepted so that a mergekit YAML imports as is; it changes nothing here.
    """

    # True for the methods with sign consensus: their divisor is Σ M_i·w_i per entry, not Σ w_i.
    elects_sign: ClassVar[bool] = False

    normalize: bool = False
    lambda_: float = msgspec.field(default=1.0, name="lambda")
    # Accepted so a mergekit YAML imports as is: there it only picks the mask's dtype to save memory, and
    # results do not change (here masks are booleans and the math is float32 anyway).
    int8_mask: bool = False

    def check(self) -> None:
        require_param(math.isfinite(self.lambda_), "parameters.lambda", "must be a finite number")

    def check_inputs(self, inputs: Sequence[InputParams]) -> None:
        # With sign consensus the divisor is per entry (an exact 0 becomes 1, as mergekit), so weights
        # summing to 0 (e.g. a negated task) still mean something there.
        if not self.elects_sign:
            refuse_zero_weight_sum(self.normalize, inputs)


class SparseConfig(TaskArithmeticConfig, frozen=True):
    """Methods that sparsify.

    rescale: keep each delta's L1 norm after masking (mergekit's rule).
    """

    rescale: bool = False


class BreadcrumbsTiesConfig(SparseConfig, frozen=True):
    elects_sign: ClassVar[bool] = True


class TiesConfig(SparseConfig, frozen=True):
    elects_sign: ClassVar[bool] = True
    normalize: bool = True


class DareConfig(SparseConfig, frozen=True):
    rescale: bool = True


class DareTiesConfig(DareConfig, frozen=True):
    elects_sign: ClassVar[bool] = True


class DensityInputParams(InputParams, frozen=True):
    """``density``: the fraction of a delta's entries kept (by magnitude, or the keep probability in DARE)."""

    density: float = 1.0

    def check(self, index: int) -> None:
        super().check(index)
        require_param(0 < self.density <= 1, f"inputs[{index}].density", f"must be in (0, 1], got {self.density}")


class BreadcrumbsInputParams(DensityInputParams, frozen=True):
    """``gamma``: the fraction of largest-|δ| entries dropped as outliers (mergekit's default 0.01)."""

    gamma: float = 0.01

    def check(self, index: int) -> None:
        super().check(index)
        require_param(0 <= self.gamma < 1, f"inputs[{index}].gamma", f"must be in [0, 1), got {self.gamma}")


# The elementwise part of a merge (weighting, sum, sign election, divisor) runs over slices of this many
# entries: every step is per entry, so slicing changes no bit, and a large tensor (an embedding matrix: 28M
# entries, 113 MB per float32 copy) needs a few slice-sized temporaries instead of five full copies.
SLICE_ENTRIES = 1 << 20


def _kept(
    delta: torch.Tensor,
    params: InputParams,
    method: Sparsification,
    rescale: bool,
    generator: torch.Generator | None,
) -> Kept:
    density = params.density if isinstance(params, DensityInputParams) else 1.0
    gamma = params.gamma if isinstance(params, BreadcrumbsInputParams) else 0.0
    return kept(delta, method, density=density, gamma=gamma, rescale=rescale, generator=generator)


def generalized_task_arithmetic(sparsification: Sparsification, consensus: Consensus | None) -> MergeFn:
    """The merge function for one combination of sparsifier and sign consensus."""

    def merge(
        deltas: Sequence[torch.Tensor],
        inputs: Sequence[InputParams],
        config: MethodConfig,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(config, TaskArithmeticConfig):
            raise TypeError(f"expected a TaskArithmeticConfig, got {type(config).__name__}")
        rescale = isinstance(config, SparseConfig) and config.rescale
        weights = [p.weight for p in inputs]
        # Masks need the whole tensor (top-k, rescale norms); the rest is per entry.
        sparse = [_kept(delta, p, sparsification, rescale, generator) for delta, p in zip(deltas, inputs, strict=True)]
        n = deltas[0].numel()
        if n <= SLICE_ENTRIES:
            return _combine(deltas, sparse, weights, consensus, config)
        flat = [d.reshape(-1) for d in deltas]
        out = torch.empty(n, dtype=torch.float32)
        for lo in range(0, n, SLICE_ENTRIES):
            hi = min(n, lo + SLICE_ENTRIES)
            parts = [f[lo:hi] for f in flat]
            out[lo:hi] = _combine(parts, [k.slice(lo, hi) for k in sparse], weights, consensus, config)
        return out.view(deltas[0].shape)

    merge.__name__ = f"task_arithmetic_{sparsification.value}_{consensus or 'none'}"
    return merge


def _combine(
    deltas: Sequence[torch.Tensor],
    sparse: Sequence[Kept],
    weights: Sequence[float],
    consensus: Consensus | None,
    config: TaskArithmeticConfig,
) -> torch.Tensor:
    """Steps 2-4 of the module docstring on (a slice of) the deltas, with their masks: a new tensor."""

    def weighted(i: int) -> torch.Tensor:
        out = sparse[i].apply(deltas[i], weights[i])
        return out.clone() if out is deltas[i] else out  # ours to modify, never the caller's input

    held = [weighted(i) for i in range(len(deltas))]
    mixed = held[0].clone()
    for d in held[1:]:
        mixed += d
    if consensus == "sum":
        # Elect by mass: the sign of the weighted sum (0 counts as +, as mergekit).
        elected = torch.where(mixed >= 0, 1.0, -1.0)
        mixed.zero_()
        per_entry = torch.zeros_like(mixed)
        for d, w in zip(held, weights, strict=True):
            # 1.0 where d has the elected sign, else 0.0 (a zero entry never agrees), in float arithmetic:
            # boolean intermediates and bool-by-float products are several times slower in torch.
            agrees = torch.mul(d, elected).sign_().clamp_(min=0.0)
            mixed.addcmul_(d, agrees)  # += d·agrees, exact: agrees is 0 or 1
            per_entry.add_(agrees, alpha=w)
        # An entry no input agrees on is 0 already; dividing it by 1 leaves it so.
        divisor: torch.Tensor | float = per_entry.masked_fill_(per_entry == 0, 1.0)
    elif consensus is None:
        total = math.fsum(weights)
        divisor = 1.0 if abs(total) < ZERO_SUM else total
    else:
        raise NotImplementedError(consensus)

    if config.normalize:
        mixed /= divisor
    if config.lambda_ != 1:
        mixed *= config.lambda_
    return mixed
