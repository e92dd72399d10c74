"""``logit_fusion`` (dynamic logit fusion): the chosen experts decode ONE answer together in the torch
engine, mixing their next-token distributions with per-step weights (``serving/logit_fusion.py`` holds the
mixture, the formula and its sources).

Unlike the other aggregators it does not combine finished answers: ``fuses_logits`` tells the serving
layer (``composition/compose.py``) to hand the composition's chosen experts to the engine as one fused
request (``fusion``) instead of answering each and calling ``combine``. The experts must be the base
and/or LoRA adapters of one base model (they share its tokenizer); composition creation checks that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from aggregators.base import AGGREGATORS, Aggregator, AggregatorConfig, require
from serving.engine import FusedMember, Fusion


class LogitFusionConfig(AggregatorConfig, frozen=True):
    """Parameters of ``logit_fusion``.

    mode: "static": mix with the router's weights; "entropy": reweight them every step by each expert's
        confidence.
    tau: entropy mode: weights ∝ router weight · exp(-entropy / tau); a small tau follows the most confident
        expert.
    """

    mode: Literal["static", "entropy"] = "entropy"
    tau: float = 1.0

    def check(self) -> None:
        require(math.isfinite(self.tau) and self.tau > 0, "tau", "must be a positive number")


@AGGREGATORS.register
class LogitFusion(Aggregator):
    name = "logit_fusion"
    config_cls = LogitFusionConfig
    help = (
        "The experts (one base and its LoRA adapters) decode one answer together in the torch engine, "
        "mixing their next-token distributions with per-step weights (static, or by confidence)."
    )
    fuses_logits = True
    streams_output = True  # the fused decode streams as any single answer does

    config: LogitFusionConfig

    def max_tokens(self, requested: int) -> int:
        return requested  # the fused answer is the answer

    def fusion(self, members: Sequence[FusedMember]) -> Fusion:
        """The fused request's spec for the chosen experts (their router weights as the prior)."""
        return Fusion(tuple(members), mode=self.config.mode, tau=self.config.tau)
