"""Per-token expert choice at one LoRA target module: the scoring math each token router runs inside the engine.

Pure tensor functions of a module's input ``x`` [tokens, d] and the stacked per-expert router state of that
module (one row per expert); each returns a ``Route`` (experts and weights [tokens, k]). Experts whose
``available`` flag is False (the adapter does not adapt the module) are never chosen. The routers in
``routers/token`` hold the configs (top_k, temperature), fit or train the states and call these.

- Arrow (``arrow_route``): score_e = |x·v_e| with v_e the unit top right singular vector of B_e·A_e (its sign
  is arbitrary, hence the absolute value); the top_k experts are kept and weighted by a softmax with
  temperature over their scores alone.
- PHATGOOSE (``phatgoose_route``): the token and every gate vector g_e are standardized (``standardize``),
  score_e = x̂·ĝ_e / √d; a softmax over the available experts, the top_k (2 in the paper) kept and their
  probabilities renormalized to sum to 1.
- mixer (``mixer_route``): gate_e = σ(w_e·x/√d + b_e); the top_k experts by gate are kept with their gates
  as the weights, not renormalized.
- GLIDER: the local router's (PHATGOOSE's or Arrow's) scores plus a per-query global bias [E], one row per
  sequence repeated for its tokens, added before the top-k: every function here takes it as ``bias``
  [tokens, E] (for mixer it joins the logits, before the sigmoid).
"""

from __future__ import annotations

import math

import torch

from serving.mixture.route import Route, softmax_of_sorted

STD_EPS = 1e-6  # a constant vector (a zero gate) standardizes to zeros instead of dividing by 0


# -- Arrow --------------------------------------------------------------------------------------------


def arrow_k(available: torch.Tensor, top_k: int) -> int:
    """Experts Arrow keeps per token: ``top_k``, capped by the fewest available experts of the modules
    (``available`` [E] or [M, E])."""
    return min(top_k, int(available.reshape(-1, available.shape[-1]).sum(dim=1).min()))


def arrow_route(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    available: torch.Tensor,
    top_k: int,
    temperature: float,
    bias: torch.Tensor | None = None,
    *,
    k: int | None = None,
    all_available: bool | None = None,
) -> Route:
    """Arrow's route for M modules that read the same ``x`` [tokens, d], each with its own prototypes:
    ``prototypes`` [M, E, d] (or [M*E, d]), ``available`` [M, E], ``bias`` broadcastable to [tokens, M, E].

    score = |x·v_e| (+ bias); the top ``k`` per module kept; weights = softmax(score / temperature) over them.
    One score matmul over the concatenated prototypes and one top-k over the last axis give exactly each
    module's own route; returns experts and weights [tokens, M, k]. ``k`` (``arrow_k``, equal in every
    module) and ``all_available``, when the caller has them, spare two host reads of ``available``."""
    M, E = available.shape
    dots = (x @ prototypes.reshape(M * E, -1).T.to(x.dtype)).view(-1, M, E)
    if k is None:
        k = arrow_k(available, top_k)
    return arrow_pick(dots, available, k, temperature, bias, all_available=all_available)


def arrow_pick(
    dots: torch.Tensor,
    available: torch.Tensor,
    k: int,
    temperature: float,
    bias: torch.Tensor | None = None,
    *,
    all_available: bool | None = None,
) -> Route:
    """Arrow's choice from the dot products ``dots`` [..., E] of tokens with the prototypes (``available``
    broadcastable to them): |dots| (+ bias), the top ``k`` kept, weighted by a softmax with temperature over them.
    The mixture layer and moerge's vLLM op (which reads the dots off its LoRA product) both end here."""
    scores = dots.abs()
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if all_available is None:
        all_available = bool(available.all())
    if not all_available:
        scores = scores.masked_fill(~available.to(scores.device), float("-inf"))
    top, experts = scores.topk(k, dim=-1)  # sorted: the first column is each row's maximum
    return Route(experts, softmax_of_sorted(top, temperature))


# -- PHATGOOSE ----------------------------------------------------------------------------------------


def standardize(v: torch.Tensor) -> torch.Tensor:
    """Each row (last dimension) minus its mean, divided by its standard deviation (Bessel-corrected, as
    torch.std) plus ``STD_EPS``; a constant row becomes zeros."""
    centered = v - v.mean(dim=-1, keepdim=True)
    return centered / (v.std(dim=-1, keepdim=True) + STD_EPS)


def phatgoose_scores(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """[tokens, E] scores standardize(x)·standardize(gates)ᵀ / √d for x [tokens, d], gates [E, d]."""
    d = x.shape[-1]
    return (standardize(x) @ standardize(gates.to(x.dtype)).T) / math.sqrt(d)


def phatgoose_route(
    x: torch.Tensor, gates: torch.Tensor, available: torch.Tensor, top_k: int, bias: torch.Tensor | None = None
) -> Route:
    """PHATGOOSE's route at one module: ``phatgoose_scores`` (+ ``bias`` [tokens, E]), a softmax over the
    ``available`` [E] experts, the top_k kept and their probabilities renormalized to sum to 1."""
    return phatgoose_pick(phatgoose_scores(x, gates), available, min(top_k, int(available.sum())), bias)


def phatgoose_pick(
    scores: torch.Tensor,
    available: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    all_available: bool | None = None,
) -> Route:
    """PHATGOOSE's choice from its ``scores`` [..., E]: (+ bias), a softmax over the available experts, the top
    ``k`` kept and renormalized."""
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if not (all_available if all_available is not None else bool(available.all())):
        scores = scores.masked_fill(~available.to(scores.device), float("-inf"))
    # softmax, top-k, renormalize == a softmax over the kept scores alone (the dropped terms cancel)
    top, experts = scores.topk(k, dim=-1)
    return Route(experts, softmax_of_sorted(top))


# -- mixer (LoRA-Mixer's trained router) -----------------------------------------------------------------


def mixer_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., E] logits x·w_e/√d + b_e (+ extra) for x [..., d], weight [E, d], bias [E], extra [..., E]."""
    logits = (x @ weight.T.to(x.dtype)) / math.sqrt(x.shape[-1]) + bias.to(x.dtype)
    if extra is not None:
        logits = logits + extra.to(logits.dtype)
    return logits


def mixer_gates(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., E] gates σ(``mixer_logits``)."""
    return torch.sigmoid(mixer_logits(x, weight, bias, extra))


def mixer_route(
    x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, top_k: int, bias: torch.Tensor | None = None
) -> Route:
    """The mixer's route at one module: of the available experts (``state`` [E, d + 1]: w_e then b_e; ``bias``
    [tokens, E] is added to the logits) the top_k by gate kept, their gates as the weights, not renormalized."""
    logits = mixer_logits(x, state[:, :-1], state[:, -1], bias)
    return mixer_pick(logits, available, min(top_k, int(available.sum())))


def mixer_pick(logits: torch.Tensor, available: torch.Tensor, k: int, *, all_available: bool | None = None) -> Route:
    """The mixer's choice from its ``logits`` [..., E]: the top ``k`` available experts, their gates σ(logit) as
    weights. Ranked by logit, the same order as by gate, except that gates which round to 1.0 in float32 (a trained
    router's logits pass 17) would tie and leave the choice among them to ``topk``'s implementation."""
    if not (all_available if all_available is not None else bool(available.all())):
        logits = logits.masked_fill(~available.to(logits.device), float("-inf"))
    top, experts = logits.topk(k, dim=-1)
    return Route(experts, torch.sigmoid(top))
