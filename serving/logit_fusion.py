"""Logit fusion in the torch engine: several members of one base decode ONE answer together.

A fused request (``GenRequest.fusion``) names members: the base and/or LoRA adapters of one base model,
each with a prior weight (the router's). They share the tokenizer, so their next-token distributions
are over the same vocabulary and can be mixed. The engine gives every member its own row in one
``generate`` call (PEFT's mixed-adapter batch runs each row on its own adapter, so one forward pass
computes every member's distribution) and two hooks from this module keep the group in step:

* ``_FusionMixer`` (a logits processor): mixes the group's distributions with the step's weights,
  chooses ONE token from the mixture (greedy, or sampled with the request's temperature, top-p and seed)
  and leaves only that token open on every row of the group, so every member appends the same token
  and conditions its next step on the shared answer.
* ``_FusionStopper`` (a stopping criterion): the group's first row (the *leader*) carries the request:
  its stop strings, streaming and delivery; the other rows never deliver anything and end when the
  leader ends (or is cancelled).

The per-step weights (``step_weights``)
------------------------------------------
``static``: the prior, w_i = π_i (normalized).

``entropy`` (the default): w_i ∝ π_i · exp(-H_i / τ), with H_i the entropy (nats) of member i's
next-token distribution at this step. A member that is confident about the next token (low entropy)
most likely knows this part of the answer; one that is spread out over many tokens is guessing. This is
the idea of *dynamic logit fusion* (Fan et al., 2024, "On Giant's Shoulders: Effortless Weak to Strong
by Dynamic Logits Fusion"): re-allocate the experts' weights at every decoding step instead of a fixed
ratio. There the weights come from a KL-constrained optimization per step; here they come in closed
form from the same kind of problem: w = argmax_w Σ_i w_i·(-H_i) - τ·KL(w ‖ π) over the simplex has the
solution w_i ∝ π_i·exp(-H_i/τ). So the weights prefer confident members while staying close to the
router's prior; τ sets the trade-off (τ → ∞ gives ``static``, τ → 0 the single most confident member).
The weights are computed from the members' untempered (T = 1) distributions: confidence is a property
of the model, not of the sampling temperature.

Why mix probabilities, not logits
---------------------------------
The fused distribution is p = Σ_i w_i · p_i (a mixture; computed in log space). A mixture keeps a token
that one confident expert wants even when the others find it unlikely: the expert that knows the answer
can carry it. Mixing logits (a weighted geometric mean, a product of experts) lets any member veto a
token, which suits experts that agree on style, not experts with different knowledge. A sampled request
mixes the members' tempered distributions softmax(l_i / T) (so a single member samples exactly as it
would alone) and then applies top-p to the mixture.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from transformers import LogitsProcessor, StoppingCriteria

from core.errors import MoergeError, ValidationFailed
from serving.engine import FusedMember, Fusion, GenerationFailed, GenRequest, Sampling

MODES = ("static", "entropy")


# --- the pure part: weights and the mixture -------------------------------------------------------------


def normalized_prior(prior: Sequence[float] | torch.Tensor, members: int) -> torch.Tensor:
    """The prior as a distribution over the members (non-negative; uniform if it sums to zero)."""
    p = torch.as_tensor(prior, dtype=torch.float32).flatten().clamp_min(0.0)
    if p.numel() != members:
        raise ValueError(f"{p.numel()} prior weights for {members} members")
    total = float(p.sum())
    return p / total if total > 0 and math.isfinite(total) else torch.full((members,), 1.0 / members)


def step_weights(
    logits: torch.Tensor, prior: Sequence[float] | torch.Tensor, mode: str = "entropy", tau: float = 1.0
) -> torch.Tensor:
    """The step's member weights (they sum to 1) from ``logits`` [members, vocab]; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; known: {', '.join(MODES)}")
    prior_t = normalized_prior(prior, logits.shape[0])
    if mode == "static":
        return prior_t
    if not tau > 0:
        raise ValueError("tau must be positive")
    probs = torch.softmax(logits.float(), dim=-1)
    entropy = torch.special.entr(probs).sum(dim=-1)  # -Σ p·log p, with 0·log 0 = 0
    return torch.softmax(prior_t.log() - entropy / tau, dim=0)  # a zero prior stays zero


def mix_distributions(
    logits: torch.Tensor,
    prior: Sequence[float] | torch.Tensor,
    mode: str = "entropy",
    tau: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [vocab], weights [members]): the step's weights and the mixture Σ_i w_i·softmax(l_i / T)."""
    weights = step_weights(logits, prior, mode, tau)
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    top = int(torch.argmax(weights))
    if float(weights[top]) == 1.0:  # all weight on one member: exactly its own distribution
        return torch.softmax(scaled[top], dim=-1), weights
    log_mix = torch.logsumexp(weights.log()[:, None] + torch.log_softmax(scaled, dim=-1), dim=0)
    return log_mix.exp(), weights


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (the best one always)."""
    if top_p >= 1.0:
        return probs
    ordered, order = torch.sort(probs, descending=True)
    ordered = ordered.masked_fill((ordered.cumsum(-1) - ordered) >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, ordered)


# --- validation: what a fused request may name ------------------------------------------------------


def _refuse(member: FusedMember, reason: str) -> ValidationFailed:
    return ValidationFailed(f"logit fusion: member {member.name!r} {reason}", param="experts")


def check_fusion(request: GenRequest) -> Fusion:
    """The request's fusion spec, or ValidationFailed (param ``experts``) naming the member that cannot
    take part: every member must run on the request's base, as the base itself or a LoRA adapter of it."""
    fusion = request.fusion
    if fusion is None or not fusion.members:
        raise ValidationFailed("logit fusion needs at least one member", param="experts")
    if fusion.mode not in MODES:
        raise ValidationFailed(f"logit fusion: unknown mode {fusion.mode!r}; known: {', '.join(MODES)}", param="mode")
    if not (math.isfinite(fusion.tau) and fusion.tau > 0):
        raise ValidationFailed("logit fusion: tau must be a positive number", param="tau")
    names = [m.name for m in fusion.members]
    if len(set(names)) != len(names):
        raise ValidationFailed(f"logit fusion: a member is named twice ({', '.join(names)})", param="experts")
    base = request.target
    for member in fusion.members:
        if not (math.isfinite(member.weight) and member.weight >= 0):
            raise _refuse(member, f"has weight {member.weight}; weights must be finite and non-negative")
        t = member.target
        if t.base_id != base.base_id or Path(t.base_dir) != Path(base.base_dir):
            raise _refuse(
                member,
                f"runs on base {t.base_id!r}, not {base.base_id!r}: fused members must share one base "
                "(and so its tokenizer)",
            )
        if t.adapter_dir is not None:
            _check_lora(member, Path(t.adapter_dir))
    if sum(m.weight for m in fusion.members) <= 0:
        raise ValidationFailed("logit fusion: the member weights sum to zero", param="experts")
    return fusion


def _check_lora(member: FusedMember, adapter_dir: Path) -> None:
    """Fusion runs members as rows of a PEFT mixed-adapter batch: LoRA (without DoRA) only. An unreadable
    config is left to the engine's own adapter loading (which reports it as a failed load)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise _refuse(member, f"is a {peft_type or 'non-LoRA'} adapter; only the base and LoRA adapters can be fused")
    if config.get("use_dora"):
        raise _refuse(member, "is a DoRA adapter, which cannot run in a mixed-adapter batch")


# --- the engine side: groups of rows ------------------------------------------------------------------


class Row(Protocol):
    """What this module reads of the torch engine's rows (``serving.torch_engine._Row``)."""

    job: Any
    route: str
    out_ids: list[int]
    reason: str | None
    fusion: Any
    extra: dict[str, Any]


R = TypeVar("R", bound=Row)


class FusionGroup:
    """The rows of one fused request: ``rows[0]`` (the leader) answers; the step weights add up here."""

    def __init__(self, fusion: Fusion, rows: list[Row]) -> None:
        self.fusion = fusion
        self.rows = rows
        self.names = [m.name for m in fusion.members]
        self.prior = normalized_prior([m.weight for m in fusion.members], len(fusion.members))
        self.weight_sum = torch.zeros(len(rows), dtype=torch.float64)
        self.steps = 0
        sampling: Sampling = rows[0].job.request.sampling
        self.generator: torch.Generator | None = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)
        for row in rows:
            row.fusion = self

    @property
    def leader(self) -> Row:
        return self.rows[0]

    @property
    def over(self) -> bool:
        return self.leader.reason is not None or bool(self.leader.job.cancelled)

    def record(self, weights: torch.Tensor) -> None:
        self.weight_sum += weights.double()
        self.steps += 1
        self.leader.extra["fusion"] = self.summary()

    def summary(self) -> dict[str, Any]:
        mean = (self.weight_sum / max(self.steps, 1)).tolist()
        return {
            "mode": self.fusion.mode,
            "tau": self.fusion.tau,
            "members": list(self.names),
            "prior": [round(float(w), 6) for w in self.prior],
            "steps": self.steps,
            "mean_weights": {name: round(float(w), 6) for name, w in zip(self.names, mean, strict=True)},
        }


def fused_rows(request: GenRequest, prepare: Callable[[GenRequest], R], job: Any, *, switching: bool) -> list[R]:
    """One row per member, the first carrying ``job`` (the caller's request: its delivery, stop strings,
    streaming and cancellation). ``prepare`` makes a non-delivering row for a request (the engine's own
    validation, prompt encoding and adapter loading); a member that fails is named in the error."""
    fusion = check_fusion(request)
    if switching:
        raise ValidationFailed("logit fusion runs in mixed-adapter batches, not adapter switching", param="model")
    rows: list[R] = []
    for i, member in enumerate(fusion.members):
        # Only the leader needs the request's own sampling; the others must not stop, sample or block EOS
        # on their own (their token is forced by the mixer, and they end with the leader).
        sampling = request.sampling if i == 0 else Sampling(max_tokens=request.sampling.max_tokens)
        member_request = dataclasses.replace(request, target=member.target, sampling=sampling, fusion=None)
        try:
            rows.append(prepare(member_request))
        except ValidationFailed:
            raise
        except Exception as exc:
            detail = exc.message if isinstance(exc, MoergeError) else f"{type(exc).__name__}: {exc}"
            raise GenerationFailed(f"logit fusion member {member.name!r}: {detail}", param="experts") from exc
    rows[0].job = job
    FusionGroup(fusion, list(rows))
    return rows


def batches(rows: list[R], size: int) -> Iterator[list[R]]:
    """Rows in batches of at most ``size``, never splitting a fused group (a group larger than ``size``
    runs as one batch of its own: its members must decode in one ``generate`` call)."""
    batch: list[R] = []
    i = 0
    while i < len(rows):
        group = rows[i].fusion
        j = i + 1
        while group is not None and j < len(rows) and rows[j].fusion is group:
            j += 1
        unit = rows[i:j]
        if batch and len(batch) + len(unit) > size:
            yield batch
            batch = []
        batch.extend(unit)
        i = j
    if batch:
        yield batch


class _FusionMixer(LogitsProcessor):
    """Every step: mix each group's distributions, choose one token, force it on every row of the group."""

    def __init__(self, rows: Sequence[Row], eos_ids: frozenset[int]) -> None:
        self.eos_ids = sorted(eos_ids)
        found: dict[int, tuple[FusionGroup, list[tuple[int, int]]]] = {}
        for i, row in enumerate(rows):
            group = row.fusion
            if group is not None:
                found.setdefault(id(group), (group, []))[1].append((group.rows.index(row), i))
        # (group, batch indices, member indices), in the group's member order so weights line up with the prior
        self.groups: list[tuple[FusionGroup, list[int], list[int]]] = []
        for group, pairs in found.values():
            pairs.sort()
            self.groups.append((group, [i for _, i in pairs], [m for m, _ in pairs]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for group, idx, members in self.groups:
            if group.over:
                continue  # the stopper ends the other rows
            token, weights = self.choose(group, scores[idx], members)
            full = torch.zeros(len(group.rows), dtype=torch.float32)
            full[members] = weights
            group.record(full)
            forced = torch.full_like(scores[idx[0]], float("-inf"))
            forced[token] = 0.0
            for i in idx:
                scores[i] = forced
        return scores

    def choose(self, group: FusionGroup, logits: torch.Tensor, members: list[int]) -> tuple[int, torch.Tensor]:
        fusion, sampling = group.fusion, group.leader.job.request.sampling
        prior = group.prior[members]
        temperature = sampling.temperature if group.generator is not None else 1.0
        probs, weights = mix_distributions(logits, prior, fusion.mode, fusion.tau, temperature)
        leader = group.leader
        if self.eos_ids and (sampling.ignore_eos or len(leader.out_ids) < sampling.min_tokens):
            probs = probs.clone()
            probs[self.eos_ids] = 0.0
        if group.generator is None:
            return int(torch.argmax(probs)), weights
        probs = top_p_filter(probs, sampling.top_p)
        return int(torch.multinomial(probs, 1, generator=group.generator).item()), weights


class _FusionStopper(StoppingCriteria):
    """Ends a group's other rows when its leader has ended (finished, stopped at a stop string, or its
    caller went away). Runs after the engine's tracker in the same step."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(self.rows):
            group = row.fusion
            if group is not None and row is not group.leader and row.reason is None and group.over:
                row.reason = "fused"
            done[i] = row.reason is not None
        return done  # type: ignore[return-value]


def hooks(rows: Sequence[Row], eos_ids: frozenset[int]) -> tuple[list[LogitsProcessor], list[StoppingCriteria]]:
    """The logits processors and stopping criteria a batch with fused groups needs (none without)."""
    if not any(row.fusion is not None for row in rows):
        return [], []
    return [_FusionMixer(rows, eos_ids)], [_FusionStopper(rows)]
