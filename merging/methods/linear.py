"""``linear``: the weighted average of full tensors (model soups), Σ w_i·W_i / Σ w_i.

As mergekit 0.1.5's ``mergekit/merge_methods/linear.py``: ``normalize`` defaults to true and divides by
the sum of the weights (no base model involved: every input, a base included if listed, is averaged).
mergekit divides by a zero sum (inf/NaN); here ``configure`` refuses such weights with ``normalize``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merging.methods.base import ZERO_SUM, InputParams, MethodConfig, refuse_zero_weight_sum


class LinearConfig(MethodConfig, frozen=True):
    """Parameters of ``linear``.

    normalize: divide the weighted sum by the sum of the weights (true: a weighted average).
    """

    normalize: bool = True

    def check_inputs(self, inputs: Sequence[InputParams]) -> None:
        refuse_zero_weight_sum(self.normalize, inputs)


def linear(
    tensors: Sequence[torch.Tensor],
    inputs: Sequence[InputParams],
    config: MethodConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not isinstance(config, LinearConfig):
        raise TypeError(f"expected a LinearConfig, got {type(config).__name__}")
    merged = torch.zeros_like(tensors[0])
    for tensor, params in zip(tensors, inputs, strict=True):
        merged.add_(tensor, alpha=params.weight)
    if config.normalize:
        total = math.fsum(p.weight for p in inputs)
        if abs(total) < ZERO_SUM:  # configure refuses this; a direct caller gets an error, not NaN
            raise ValueError("linear: weights sum to 0, cannot normalize")
        merged.div_(total)
    return merged
