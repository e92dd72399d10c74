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

import torch

# Below this L1 norm (before or after masking) the kept entries are not rescaled (mergekit's eps).
RESCALE_EPS = 1e-7


class Sparsification(enum.Enum):
    none = "none"
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"


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
    # The k-th largest is the (n − k + 1)-th smallest: a selection, not a sort.
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    at_threshold = flat == threshold
    need = k - int(mask.sum())
    tied = int(at_threshold.sum())
    if tied == need:
        mask |= at_threshold
    else:
        # More entries equal the threshold than places left: the first `need` of them by position.
        rank_dtype = torch.int32 if n < 2**31 else torch.int64
        mask |= at_threshold & (torch.cumsum(at_threshold, dim=0, dtype=rank_dtype) <= need)
    return mask.reshape(scores.shape)


def keep_count(density: float, numel: int) -> int:
    """Entries a ``density`` keeps: mergekit's int(density·n), at least 1 in a nonempty tensor."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


def apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta`` with the unmasked entries zeroed; with ``rescale`` the kept ones scaled so the L1 norm
    matches the original's (mergekit's ``rescale``)."""
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``keep_count(density, n)`` entries largest in |δ| (TIES' trim).

    As mergekit 0.1.5: density ≥ 1 returns δ untouched (no rescale), and a positive density keeps at
    least one entry.
    """
    if density >= 1:
        return delta
    mask = top_k_mask(delta.abs(), keep_count(density, delta.numel()))
    return apply_mask(delta, mask, rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma·n) largest |δ| and the smallest, keeping k = int(density·n).

    When k + int(gamma·n) > n, fewer outliers are dropped so k entries stay (as mergekit). When
    int(gamma·n) is 0 (gamma = 0, or gamma·n < 1) no outlier is dropped and the k largest stay: the delta
    is never silently dropped. mergekit before 0.1.5 sliced ``[n_bot:-n_top]``, which is empty for
    n_top = 0 and so dropped the whole delta; 0.1.5 keeps the k largest as here. One deliberate
    difference remains: when density·n < 1, mergekit 0.1.5 keeps nothing (k = 0), ours keeps one entry,
    as its ``magnitude`` does. density ≥ 1 returns δ untouched whatever gamma (as mergekit).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = keep_count(density, n)
    n_bottom = max(0, n - keep - int(gamma * n))
    n_top = n - n_bottom - keep  # outliers actually dropped
    scores = delta.abs()
    # Kept = the (keep + n_top) largest minus the n_top largest; nested masks make this exact.
    mask = top_k_mask(scores, keep + n_top)
    if n_top > 0:
        mask &= ~top_k_mask(scores, n_top)
    return apply_mask(delta, mask, rescale)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, drawn from ``generator`` only (never the
    global RNG), so a merge is reproducible from its seed. density ≥ 1 returns δ untouched."""
    if density >= 1:
        return delta
    if generator is None:
        raise ValueError("random sparsification needs a seeded torch.Generator")
    # Draw on the generator's device (it cannot draw elsewhere), then move the mask to the delta.
    draws = torch.rand(delta.shape, generator=generator, device=generator.device)
    mask = (draws < density).to(delta.device)
    return apply_mask(delta, mask, rescale)


def sparsify(
    delta: torch.Tensor,
    method: Sparsification,
    *,
    density: float = 1.0,
    gamma: float = 0.0,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if method is Sparsification.none:
        return delta
    if method is Sparsification.magnitude:
        return magnitude(delta, density, rescale)
    if method is Sparsification.magnitude_outliers:
        return magnitude_outliers(delta, density, gamma, rescale)
    if method is Sparsification.random:
        return dare(delta, density, generator, rescale)
    raise NotImplementedError(method)
