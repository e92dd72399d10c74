"""``glider``: a local token router's scores plus a global, per-query preference for some experts (Li et al.,
2024, "Glider: Global and Local Instruction-Driven Expert Router").

GLIDER's global router has an LLM write a task instruction for the query; the instruction's embedding is
compared with each expert's task embedding by cosine similarity, and that similarity, scaled, joins the local
(token-level, per-module) router's scores before the top-k, in every module alike, so the experts the query's
task is about are favoured across all layers while each token still chooses locally. Here:

    bias_e = scale · cos(q, t_e) = scale · q·t_e / (‖q‖·‖t_e‖)

with q the embedding of the query's task description and t_e that of expert e's description
(:func:`glider_bias`). Source: GLIDER's global router (an LLM-written task instruction, embedded, matched to
the experts' embeddings by cosine similarity, its scores combined with the local router's). The paper's full
text could not be consulted offline while writing this, so the additive form with one ``scale`` follows the
paper's abstract and DESIGN.md ("PHATGOOSE or Arrow scores plus a global bias from the similarity ..."),
not a checked equation.

The local router (``local``: ``phatgoose``, GLIDER's choice, or ``arrow``) adds the bias to its token scores before its
top-k (``serving/mixture/scores.py``). ``scale`` (a config field, default 1) trades global against local: PHATGOOSE's
scores are standardized dot products / √d, Arrow's are |x·v| with unit v, so the useful scale depends on the local
router. The serving layer (``composition/mixtures.py``) lets the `instruct` query router compute the cosines (the base
LLM describes the query's task; the description is embedded and compared with the experts' stored embeddings), scales
them as ``glider_bias`` does, and passes the result to every module as ``MixtureLinear.row_bias`` (one row per
sequence).

The state (gates or prototypes) is the local router's, stored under its name: a glider mixture reuses what
a phatgoose or arrow mixture over the same experts already fitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import torch

from routers.query.base import require
from routers.token.base import TOKEN_ROUTERS, FitContext, TokenRouter, TokenRouterConfig
from serving.mixture.adapters import LoraAdapter
from serving.mixture.route import Route

LOCAL_ROUTERS = ("phatgoose", "arrow")

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def glider_bias(query_embedding: ArrayLike, expert_embeddings: ArrayLike, scale: float = 1.0) -> torch.Tensor:
    """GLIDER's global bias [E]: ``scale`` · cosine similarity between ``query_embedding`` [D] (the query's
    task description, embedded) and each row of ``expert_embeddings`` [E, D] (the experts' descriptions,
    embedded with the same model), in float32. Rows need not be normalized; a zero vector gives 0.

    For a batch, call it per sequence and stack the rows: [batch, E] is what ``MixtureLinear.row_bias`` takes.
    """
    q = torch.as_tensor(np.asarray(query_embedding, dtype=np.float32))
    t = torch.as_tensor(np.asarray(expert_embeddings, dtype=np.float32))
    if q.dim() != 1 or t.dim() != 2 or t.shape[1] != q.shape[0]:
        raise ValueError(
            f"glider_bias needs a query embedding [D] and expert embeddings [E, D], got {list(q.shape)} and "
            f"{list(t.shape)}"
        )
    if not math.isfinite(scale):
        raise ValueError(f"glider_bias: scale must be finite, got {scale}")
    cos = torch.nn.functional.cosine_similarity(t, q.unsqueeze(0), dim=1, eps=1e-12)
    return (scale * cos).to(torch.float32)


class GliderConfig(TokenRouterConfig, frozen=True):
    """Parameters of ``glider``.

    local: the token-level router whose scores the bias is added to: ``phatgoose`` (GLIDER's) or ``arrow``.
    local_params: that router's parameters (e.g. {"top_k": 2, "training": {"steps": 100}}), validated as its own.
    scale: weight of the global bias, bias = scale · cos(query task, expert description) (finite, >= 0).
    model: slug of the model that writes the query's task description (None: the server's default model).
    max_new_tokens: length limit of that description (1..256).
    """

    local: str = "phatgoose"
    local_params: dict[str, Any] = msgspec.field(default_factory=dict)
    scale: float = 1.0
    model: str | None = None
    max_new_tokens: int = 32

    def check(self) -> None:
        require(self.local in LOCAL_ROUTERS, "local", f"must be one of {', '.join(LOCAL_ROUTERS)}")
        require(math.isfinite(self.scale) and self.scale >= 0, "scale", "must be a finite number >= 0")
        require(self.model is None or bool(self.model.strip()), "model", "must be a slug or null")
        require(1 <= self.max_new_tokens <= 256, "max_new_tokens", "must lie between 1 and 256")
        TOKEN_ROUTERS.config(self.local, self.local_params)  # errors name router_params.<field> of the local router


@TOKEN_ROUTERS.register
class GliderRouter(TokenRouter):
    name = "glider"
    config_cls = GliderConfig
    help = "GLIDER: a local token router (phatgoose or arrow) plus a per-query bias from task-description similarity"

    config: GliderConfig

    def __init__(self, config: TokenRouterConfig | None = None) -> None:
        super().__init__(config)
        self.local = TOKEN_ROUTERS.build(self.config.local, self.config.local_params)

    @classmethod
    def query_part(cls, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The global part is the `instruct` router (its embeddings stored as instruct's states); the model writing
        the description and its length come from glider's params. Every expert keeps a score."""
        keep = {k: params[k] for k in ("model", "max_new_tokens") if params.get(k) is not None}
        return "instruct", {**keep, "threshold": -1.0}

    @classmethod
    def query_bias(cls, params: dict[str, Any], scores: list[float]) -> tuple[float, ...]:
        """``glider_bias``'s formula (scale · cosine of the query's task description and each expert's) on the
        cosines `instruct` computed from its stored expert embeddings."""
        scale = float(params.get("scale", GliderConfig().scale))
        return tuple(scale * score for score in scores)

    def requires_training_data(self) -> bool:
        return self.local.requires_training_data()

    def fit_trains(self) -> bool:
        return self.local.fit_trains()

    def state_key(self) -> tuple[str, str]:
        return self.local.state_key()

    def fit_adapter(self, adapter: LoraAdapter, context: FitContext | None = None) -> dict[str, torch.Tensor]:
        return self.local.fit_adapter(adapter, context)

    def slot_params(self) -> dict[str, Any] | None:
        local = self.local.slot_params()
        return None if local is None else {**local, "request": "bias"}  # the per-query bias travels per request

    def bias(self, query_embedding: ArrayLike, expert_embeddings: ArrayLike) -> torch.Tensor:
        """:func:`glider_bias` with this router's ``scale``."""
        return glider_bias(query_embedding, expert_embeddings, self.config.scale)

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        return self.local.route(x, state, available, bias)
