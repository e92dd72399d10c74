"""Sparsifiers for task vectors: keep part of a delta, zero the rest, optionally rescale.

- ``magnitude`` (TIES trim): keep the ``density`` fraction of entries largest in |δ|.
- ``magnitude_outliers`` (Model Breadcrumbs): drop the ``gamma`` fraction largest in |δ| (outliers) and the
  smallest, keeping a ``density`` fraction in between.
- ``random`` (DARE): keep each entry with probability ``density``.

Counts follow mergekit 0.1.5 (``mergekit/sparsify.py``): k = int(density·n) with float arithmetic as
written, so the same entries count. Selection is by threshold (``torch.kthvalue``, O(n)), never a full
sort. Ties at the threshold are broken by position (the lower flat index ranks higher), so exactly k
entries are kept and the masks for k ≤ k' are nested; mergekit sorts with an unstable sort, so at exact
ties (common in bf16 deltas) it may keep different entries of equal magnitude, never a different count.

``rescale`` follows mergekit 0.1.5, which rescales the kept entries so the tensor's L1 norm is unchanged
(``rescale_norm=l1``), not by the DARE paper's 1/density; the two agree in expectation for DARE, and the
L1 rule is deterministic given the mask. When either norm is below 1e-7 nothing is rescaled (as mergekit).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

# Below this L1 norm (before or after masking) the kept entries are not rescaled (mergekit's eps).
RESCALE_EPS = 1e-7


class Sparsification(enum.Enum):
    none = "none"
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"


# From this many entries on, the k-th largest is found through a sample (see kth_largest); the sample is
# 1/64 of the tensor within these bounds (measured: 3 ms instead of 13 ms for a 576x1536 matrix).
SAMPLED_SELECTION_MIN = 1 << 16
_SAMPLE_MIN, _SAMPLE_MAX = 1 << 12, 1 << 16


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (1 ≤ k ≤ n), exactly.

    ``torch.kthvalue`` copies the whole tensor and allocates int64 indices beside it (3x its size, 0.6 s
    for an embedding matrix here). For large tensors a strided sample brackets the threshold, everything
    above the bracket is counted, and the selection runs on the few entries inside it; if the bracket
    misses (a badly ordered tensor), it falls back to ``kthvalue`` on everything. Same value either way.
    """
    n = flat.numel()
    if n < SAMPLED_SELECTION_MIN:
        return torch.kthvalue(flat, n - k + 1).values  # the k-th largest is the (n − k + 1)-th smallest
    step = n // min(max(n // 64, _SAMPLE_MIN), _SAMPLE_MAX)
    sample = flat[::step].contiguous()
    m = sample.numel()
    expected = k * m / n  # the threshold's rank in the sample, counted from the top
    margin = 6 * math.sqrt(max(expected * (1 - k / n), 1.0)) + 8
    top_rank = max(1, math.floor(expected - margin))  # a sample value likely above the threshold
    low_rank = min(m, math.ceil(expected + margin))  # and one likely below it
    upper = torch.kthvalue(sample, m - top_rank + 1).values
    lower = torch.kthvalue(sample, m - low_rank + 1).values
    above = int(torch.count_nonzero(flat > upper))  # .sum() of booleans would widen them to int64 first
    need = k - above
    if top_rank > 1 and low_rank < m and need >= 1:
        inside = flat[(flat <= upper) & (flat >= lower)]
        if need <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - need + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of exactly ``k`` entries with the largest scores.

    Ties at the threshold go to the lower flat index, a total order, so ``top_k_mask(s, a)`` is a subset
    of ``top_k_mask(s, b)`` for a ≤ b (breadcrumbs relies on it).
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    at_threshold = flat == threshold
    need = k - int(torch.count_nonzero(mask))
    tied = int(torch.count_nonzero(at_threshold))
    if tied == need:
        mask |= at_threshold
    else:
        # More entries equal the threshold than places left: the first `need` of them by position.
        mask[torch.nonzero(at_threshold).view(-1)[:need]] = True
    return mask.reshape(scores.shape)


def keep_count(density: float, numel: int) -> int:
    """Entries a ``density`` keeps: mergekit's int(density·n), at least 1 in a nonempty tensor."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


@dataclass(frozen=True)
class Kept:
    """What a sparsifier keeps of one delta: a mask (None: every entry) and the factor the kept entries
    are scaled by (None: 1). Held instead of the sparsified delta, so a merge keeps one boolean per entry
    per input rather than another float copy; ``apply`` rebuilds it with the same arithmetic each time."""

    mask: torch.Tensor | None = None
    factor: torch.Tensor | None = None

    def slice(self, lo: int, hi: int) -> Kept:
        """What is kept of the flat entries ``lo:hi`` (the factor is the whole tensor's)."""
        return Kept(self.mask.reshape(-1)[lo:hi] if self.mask is not None else None, self.factor)

    def apply(self, delta: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """The kept delta (times ``weight``): δ·mask·factor·weight, multiplied in that order, in place
        on one new tensor. Without mask, factor or weight it is ``delta`` itself."""
        if weight == 1.0:
            weight = None  # x·1 is x exactly: skip the pass
        if self.mask is None and self.factor is None and weight is None:
            return delta
        # where(), not delta·mask: torch's bool-by-float product is several times slower here and needs the
        # mask as floats. The only difference is the sign of a dropped entry's zero (+0 instead of -0), which
        # compares equal and changes no sum, sign election or divisor.
        out = torch.where(self.mask, delta, 0.0) if self.mask is not None else delta.clone()
        if self.factor is not None:
            out *= self.factor
        if weight is not None:
            out *= weight
        return out


def masked(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> Kept:
    """Keep ``mask``; with ``rescale`` the kept entries are scaled so the L1 norm matches the original's
    (mergekit's ``rescale``; below ``RESCALE_EPS`` before or after masking, no scaling)."""
    if not rescale:
        return Kept(mask)
    before = delta.abs().sum()
    after = (delta * mask).abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return Kept(mask)
    return Kept(mask, before / after)


def magnitude_kept(delta: torch.Tensor, density: float, rescale: bool = False) -> Kept:
    """Keep the ``keep_count(density, n)`` entries largest in |δ| (TIES' trim).

    As mergekit 0.1.5: density ≥ 1 keeps δ untouched (no rescale), and a positive density keeps at
    least one entry.
    """
    if density >= 1:
        return Kept()
    return masked(delta, top_k_mask(delta.abs(), keep_count(density, delta.numel())), rescale)


def outliers_kept(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> Kept:
    """Model Breadcrumbs: drop the int(gamma·n) largest |δ| and the smallest, keeping k = int(density·n).

    When k + int(gamma·n) > n, fewer outliers are dropped so k entries stay (as mergekit). When
    int(gamma·n) is 0 (gamma = 0, or gamma·n < 1) no outlier is dropped and the k largest stay: the delta
    is never silently dropped. mergekit before 0.1.5 sliced ``[n_bot:-n_top]``, which is empty for
    n_top = 0 and so dropped the whole delta; 0.1.5 keeps the k largest as here. One deliberate
    difference remains: when density·n < 1, mergekit 0.1.5 keeps nothing (k = 0), ours keeps one entry,
    as its ``magnitude`` does. density ≥ 1 keeps δ untouched whatever gamma (as mergekit).
    """
    if density >= 1:
        return Kept()
    n = delta.numel()
    keep = keep_count(density, n)
    n_bottom = max(0, n - keep - int(gamma * n))
    n_top = n - n_bottom - keep  # outliers actually dropped
    scores = delta.abs()
    # Kept = the (keep + n_top) largest minus the n_top largest; nested masks make this exact.
    mask = top_k_mask(scores, keep + n_top)
    if n_top > 0:
        mask &= ~top_k_mask(scores, n_top)
    return masked(delta, mask, rescale)


def dare_kept(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> Kept:
    """DARE: keep each entry with probability ``density``, drawn from ``generator`` only (never the
    global RNG), so a merge is reproducible from its seed. density ≥ 1 keeps δ untouched."""
    if density >= 1:
        return Kept()
    if generator is None:
        raise ValueError("random sparsification needs a seeded torch.Generator")
    # Draw on the generator's device (it cannot draw elsewhere), then move the mask to the delta.
    draws = torch.rand(delta.shape, generator=generator, device=generator.device)
    return masked(delta, (draws < density).to(delta.device), rescale)


def kept(
    delta: torch.Tensor,
    method: Sparsification,
    *,
    density: float = 1.0,
    gamma: float = 0.0,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> Kept:
    if method is Sparsification.none:
        return Kept()
    if method is Sparsification.magnitude:
        return magnitude_kept(delta, density, rescale)
    if method is Sparsification.magnitude_outliers:
        return outliers_kept(delta, density, gamma, rescale)
    if method is Sparsification.random:
        return dare_kept(delta, density, generator, rescale)
    raise NotImplementedError(method)


# The sparsified deltas themselves, for tests and one-off use.


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    return magnitude_kept(delta, density, rescale).apply(delta)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    return outliers_kept(delta, density, gamma, rescale).apply(delta)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    return dare_kept(delta, density, generator, rescale).apply(delta)
