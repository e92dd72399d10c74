"""A token-level or weighted mixture of LoRA adapters as ONE vLLM adapter slot, run by moerge's vLLM op.

vLLM serves the slot as an ordinary PEFT LoRA adapter folder; moerge's LoRA op (``serving/lora_ops.py``) recognises
it by the ``moerge_mixture.json`` beside the weights and, in every LoRA layer, gives each token its own members'
paths with the router's weights, computed from the same product that applies the adapter:

    y += ((x Aᵀ) ⊙ G) Bᵀ

Layout, alike in every target module (so one description serves every layer):

- A [R, in]: member 1's A rows (``ranks[0]`` of them, zero rows where that module's rank is lower or the member
  does not adapt it), member 2's, ..., then, for a routed kind, one router row per member: its Arrow prototype,
  its PHATGOOSE gate standardized and divided by √d, or its mixer weight divided by √d. ``x Aᵀ`` then holds the
  token's LoRA activations and its router dot products side by side;
- B [out, R]: each member's B with its scaling folded in, then one column per router row. Those columns never
  reach the output (the op multiplies them by zero) and carry per-member constants of the module in their first
  rows: row 0 the mixer bias, row 1 availability (1 where the member adapts the module: an unavailable member is
  never chosen), row 2 the sum of the standardized PHATGOOSE gate / √d (the token's mean times it is subtracted,
  which makes the score exactly ``standardize(x)·standardize(g)/√d``).

G repeats each token's weight for member e over e's columns: a top-k of the router's scores
(``serving/mixture/scores.py``, the very functions the torch mixture layer calls; on float32 CPU tensors the same
top-k and weighting run as one numba-compiled loop, ``serving/mixture/fused.py``) or, for the ``weighted`` kind,
the weights its request carries. Per-request data (GLIDER's bias, a weighted composition's weights) comes
with the request as ``vllm_xargs`` (:data:`REQUEST_KEY`), a list of one float per member.

Only moerge's own op reads this layout: stock vLLM would add every member at weight 1 and the router rows'
columns, so moerge loads such a slot into managed servers running its ops only (``serving/vllm_mixtures.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.lora import PEFT_PREFIX
from serving.engine import MIXTURE_XARG
from serving.mixture import fused
from serving.mixture.adapters import LoraAdapter
from serving.mixture.route import Route
from serving.mixture.scores import STD_EPS, arrow_pick, mixer_pick, phatgoose_pick, standardize

log = logging.getLogger(__name__)
SPEC_FILE = "moerge_mixture.json"
FORMAT = 1
# The vllm_xargs key a request's per-member vector travels under (GLIDER's bias, a weighted mixture's weights).
REQUEST_KEY = MIXTURE_XARG
ROUTED_KINDS = ("arrow", "phatgoose", "mixer")
KINDS = (*ROUTED_KINDS, "weighted")
# Rows of B's router columns that hold per-member constants of a module (see the module docstring).
BIAS_ROW, AVAILABLE_ROW, GATE_SUM_ROW = 0, 1, 2
CONSTANT_ROWS = 3
# Members in one slot: the per-request vector is one float each, and the op routes over them densely.
MAX_MEMBERS = 64


@dataclass(frozen=True)
class SlotRouting:
    """How the op routes a mixture slot (what ``moerge_mixture.json`` says).

    kind: ``arrow``, ``phatgoose``, ``mixer`` (a router row per member) or ``weighted`` (weights per request).
    ranks: columns per member (each member's highest rank over the modules).
    top_k / temperature: the router's (temperature: Arrow's softmax only).
    request: what a request's per-member vector is: ``bias`` (added to the scores: GLIDER), ``weights`` (the
        weighted kind's G), or None (ignored).
    weights: a weighted slot's weights for a request that brings none (None: uniform).
    """

    kind: str
    ranks: tuple[int, ...]
    top_k: int = 1
    temperature: float = 1.0
    request: str | None = None
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mixture slot kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 1 <= len(self.ranks) <= MAX_MEMBERS or any(r < 1 for r in self.ranks):
            raise ValueError(f"a mixture slot needs 1..{MAX_MEMBERS} members of rank >= 1, got ranks {self.ranks}")
        if self.top_k < 1 or not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("a mixture slot needs top_k >= 1 and a finite temperature > 0")
        if self.request not in (None, "bias", "weights"):
            raise ValueError(f"request must be bias, weights or null, got {self.request!r}")
        if (self.request == "weights") != (self.kind == "weighted"):
            raise ValueError("request weights go with the weighted kind, and only with it")
        if self.weights is not None and (
            len(self.weights) != len(self.ranks) or not all(math.isfinite(w) for w in self.weights)
        ):
            raise ValueError(f"weights must be {len(self.ranks)} finite numbers")

    @property
    def members(self) -> int:
        return len(self.ranks)

    @property
    def routed(self) -> bool:
        return self.kind in ROUTED_KINDS

    # cached: the op reads these on every layer call of a decode step
    @cached_property
    def lora_columns(self) -> int:
        return sum(self.ranks)

    @cached_property
    def rank(self) -> int:
        """The slot's LoRA rank R (what vLLM's --max-lora-rank must hold)."""
        return self.lora_columns + (self.members if self.routed else 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "ranks": list(self.ranks),
            "top_k": self.top_k,
            "temperature": self.temperature,
            "request": self.request,
            "weights": None if self.weights is None else list(self.weights),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotRouting:
        if data.get("format") != FORMAT:
            raise ValueError(f"{SPEC_FILE}: format {data.get('format')!r} is not {FORMAT}")
        weights = data.get("weights")
        return cls(
            kind=str(data["kind"]),
            ranks=tuple(int(r) for r in data["ranks"]),
            top_k=int(data.get("top_k", 1)),
            temperature=float(data.get("temperature", 1.0)),
            request=data.get("request"),
            weights=None if weights is None else tuple(float(w) for w in weights),
        )


def read_slot_routing(folder: str | Path) -> SlotRouting | None:
    """The routing of the mixture slot in ``folder``, or None for a plain adapter folder."""
    spec = Path(folder) / SPEC_FILE
    if not spec.is_file():
        return None
    return SlotRouting.from_json(json.loads(spec.read_text()))


def loaded_slot_routing(folder: str | Path, rank: int) -> SlotRouting | None:
    """The routing vLLM's worker gives an adapter it loaded from ``folder`` with LoRA rank ``rank``: a mixture's, or
    None for a plain adapter, and also for a spec that is unreadable or does not fit the weights loaded (an expert's
    upload may carry any file: it must neither crash the server nor route another adapter's weights)."""
    try:
        routing = read_slot_routing(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("adapter %s: its %s is not a mixture's (%s); served as a plain adapter", folder, SPEC_FILE, exc)
        return None
    if routing is not None and routing.rank != rank:
        log.warning(
            "adapter %s: its %s says rank %d, its weights %d; served as a plain adapter",
            folder,
            SPEC_FILE,
            routing.rank,
            rank,
        )
        return None
    return routing


# -- writing a slot -----------------------------------------------------------------------------------------


def router_row(kind: str, state: torch.Tensor, in_features: int) -> tuple[torch.Tensor, float, float]:
    """(row of A, mixer bias, gate sum) for one member's router ``state`` at a module (see the module docstring)."""
    root_d = math.sqrt(in_features)
    if kind == "arrow":
        return state[:in_features].float(), 0.0, 0.0
    if kind == "phatgoose":
        gate = standardize(state[:in_features].float()) / root_d
        return gate, 0.0, float(gate.sum())
    if kind == "mixer":
        return state[:in_features].float() / root_d, float(state[in_features]), 0.0
    raise ValueError(f"no router row for kind {kind!r}")


def slot_tensors(
    adapters: Sequence[LoraAdapter],
    states: Sequence[Mapping[str, torch.Tensor]],
    routing: SlotRouting,
) -> dict[str, torch.Tensor]:
    """The slot's PEFT tensors (``base_model.model.<module>.lora_A/B.weight``) for every module any member adapts."""
    if len(adapters) != routing.members or (routing.routed and len(states) != routing.members):
        raise ValueError(f"a slot of {routing.members} members needs as many adapters (and router states)")
    R, L = routing.rank, routing.lora_columns
    offsets = [sum(routing.ranks[:e]) for e in range(routing.members)]
    modules = sorted({m for a in adapters for m in a.modules})
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        present = [a.modules.get(module) for a in adapters]
        first = next(w for w in present if w is not None)
        in_features, out_features = first.A.shape[1], first.B.shape[0]
        if out_features < CONSTANT_ROWS:
            raise ValueError(f"module {module} has {out_features} outputs: a mixture slot needs {CONSTANT_ROWS}")
        A = torch.zeros(R, in_features)
        B = torch.zeros(out_features, R)
        for e, w in enumerate(present):
            if w is None:
                continue
            if w.rank > routing.ranks[e]:
                raise ValueError(f"member {e} has rank {w.rank} at {module}, above its {routing.ranks[e]} columns")
            A[offsets[e] : offsets[e] + w.rank] = w.A
            B[:, offsets[e] : offsets[e] + w.rank] = w.B * w.scale
            if routing.routed:
                state = states[e].get(module)
                if state is None:
                    raise ValueError(f"member {e} adapts {module} but has no router state there")
                row, bias, gate_sum = router_row(routing.kind, state, in_features)
                A[L + e] = row
                B[BIAS_ROW, L + e] = bias
                B[AVAILABLE_ROW, L + e] = 1.0
                B[GATE_SUM_ROW, L + e] = gate_sum
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.contiguous()
    return tensors


def write_slot(
    dest: Path,
    adapters: Sequence[LoraAdapter],
    states: Sequence[Mapping[str, torch.Tensor]],
    routing: SlotRouting,
    base_model: str = "",
) -> Path:
    """Write the slot folder at ``dest`` (atomically: built beside it, then renamed); an existing one is kept."""
    if (dest / SPEC_FILE).is_file():
        return dest
    tensors = slot_tensors(adapters, states, routing)
    leaves = sorted({key.removeprefix(PEFT_PREFIX).rsplit(".", 3)[0].rpartition(".")[2] for key in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": routing.rank,
        "lora_alpha": routing.rank,  # scaling 1: each member's own scaling is folded into its B columns
        "target_modules": leaves,
        "bias": "none",
        "base_model_name_or_path": base_model,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(tensors, str(work / "adapter_model.safetensors"))
        (work / "adapter_config.json").write_text(json.dumps(config, indent=1))
        (work / SPEC_FILE).write_text(json.dumps(routing.as_json(), indent=1))
        try:
            os.rename(work, dest)
        except OSError:
            if not (dest / SPEC_FILE).is_file():  # not a concurrent writer that got there first
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dest


# -- the op's routing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotColumns:
    """Where one mixture slot sits in a packed layer (``serving/lora_ops.py`` packs it so): from ``start``, every
    slice's LoRA columns (``slices`` x L), then every slice's router columns (``slices`` x n), so the router's dot
    products are one contiguous view; the module constants read from its B (``constants`` [slices, rows, n])."""

    routing: SlotRouting
    start: int
    slices: int
    constants: torch.Tensor
    available: torch.Tensor  # [slices, n] bool: the member adapts the slice's module
    all_available: bool
    gather: torch.Tensor  # [slices * L]: each LoRA column's gate, an index into the [tokens, slices * n] gates
    ks: tuple[int, ...]  # experts kept per token in each slice (top_k capped by its available members; 0: none)
    equal_rank: int | None  # every member's columns, when they are alike (the usual case), else None
    compiled: fused.GatePlan  # the compiled gating's arrays

    @cached_property
    def lora_stop(self) -> int:
        return self.start + self.slices * self.routing.lora_columns

    @cached_property
    def stop(self) -> int:
        return self.start + self.slices * self.routing.rank


def slot_columns(routing: SlotRouting, start: int, b_blocks: Sequence[torch.Tensor]) -> SlotColumns:
    """The slot's column map for a layer of ``len(b_blocks)`` slices; ``b_blocks`` are the slot's B per slice
    ([out, R], the columns moerge wrote)."""
    S, R, L, n = len(b_blocks), routing.rank, routing.lora_columns, routing.members
    member_of_column = torch.repeat_interleave(torch.arange(n), torch.tensor(routing.ranks))
    # routed: slice s's columns take slice s's gates; weighted: one weight per member, the same in every slice
    gather = torch.cat([s * n + member_of_column for s in range(S)]) if routing.routed else member_of_column.repeat(S)
    constants = torch.zeros(S, CONSTANT_ROWS, n)
    if routing.routed:
        for s, b in enumerate(b_blocks):
            constants[s] = b[:CONSTANT_ROWS, L:R].float()
    available = constants[:, AVAILABLE_ROW] > 0.5
    ks = tuple(min(routing.top_k, int(available[s].sum())) for s in range(S)) if routing.routed else (n,) * S
    equal_rank = routing.ranks[0] if len(set(routing.ranks)) == 1 else None
    compiled = fused.gate_plan(available, member_of_column, ks)
    return SlotColumns(routing, start, S, constants, available, bool(available.all()), gather, ks, equal_rank, compiled)


def _request_bias(
    routing: SlotRouting, request: torch.Tensor | None, tokens: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """A routed slot's per-token bias [tokens, 1, n] from the request vectors (GLIDER), or None."""
    if request is None or routing.request != "bias":
        return None
    own = fit_rows(request, tokens, routing.members)
    return torch.nan_to_num(own.to(dtype), nan=0.0).unsqueeze(1)


def slot_gates(
    columns: SlotColumns, shrunk: torch.Tensor, x: torch.Tensor, request: torch.Tensor | None
) -> torch.Tensor:
    """Each token's weight per member: [tokens, slices * members] (slice-major) for a routed slot, from its router
    columns of ``shrunk`` (the rows of ``x Aᵀ``) and the request's bias; [tokens, members] for a weighted slot, the
    request's weights. ``request`` [tokens, >= n] holds each token's request vector (NaN where it brought none)."""
    routing, S, n = columns.routing, columns.slices, columns.routing.members
    tokens = shrunk.shape[0]
    if not routing.routed:
        default = torch.full((n,), 1.0 / n) if routing.weights is None else torch.tensor(routing.weights)
        weights = default.to(shrunk.dtype).expand(tokens, n)
        if request is not None:
            weights = torch.where(torch.isnan(own := fit_rows(request, tokens, n)), weights, own.to(shrunk.dtype))
        return weights
    dots = _router_dots(columns, shrunk)
    bias = _request_bias(routing, request, tokens, shrunk.dtype)
    gates = shrunk.new_zeros(tokens, S, n)
    if len(set(columns.ks)) == 1:  # the usual case: every slice keeps as many
        if columns.ks[0]:
            route = _pick(
                routing, dots, x, columns.constants, columns.available, columns.all_available, columns.ks[0], bias
            )
            gates.scatter_(-1, route.experts, route.weights.to(gates.dtype))
        return gates.view(tokens, S * n)
    for s, k in enumerate(columns.ks):  # members adapt the slices unalike: each slice its own k, as the torch layer
        if k:
            one = slice(s, s + 1)
            available = columns.available[one]
            route = _pick(routing, dots[:, one], x, columns.constants[one], available, bool(available.all()), k, bias)
            gates[:, one] = gates[:, one].scatter(-1, route.experts, route.weights.to(gates.dtype))
    return gates.view(tokens, S * n)


def _router_dots(columns: SlotColumns, block: torch.Tensor) -> torch.Tensor:
    """The router's dot products [tokens, slices, n]: a view of the slot's ``block`` of ``x Aᵀ`` (its LoRA columns,
    then its router columns)."""
    lora, n = columns.slices * columns.routing.lora_columns, columns.routing.members
    return block[:, lora : lora + columns.slices * n].view(block.shape[0], columns.slices, n)


def _phatgoose_scores(dots: torch.Tensor, x: torch.Tensor, constants: torch.Tensor) -> torch.Tensor:
    flat = x[: dots.shape[0]].to(dots.dtype)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True) + STD_EPS
    # standardize(x)·ĝ/√d = (x·ĝ/√d - mean(x)·Σĝ/√d) / (std(x) + eps)
    return (dots - mean.unsqueeze(-1) * constants[:, GATE_SUM_ROW]) / std.unsqueeze(-1)


def _mixer_logits(dots: torch.Tensor, constants: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = dots + constants[:, BIAS_ROW]
    return logits if bias is None else logits + bias


def _pick(
    routing: SlotRouting,
    dots: torch.Tensor,
    x: torch.Tensor,
    constants: torch.Tensor,
    available: torch.Tensor,
    every: bool,
    k: int,
    bias: torch.Tensor | None,
) -> Route:
    """The router's choice from the dot products ``dots`` [tokens, slices, n] with its router rows."""
    if routing.kind == "arrow":
        return arrow_pick(dots, available, k, routing.temperature, bias, all_available=every)
    if routing.kind == "phatgoose":
        return phatgoose_pick(_phatgoose_scores(dots, x, constants), available, k, bias, all_available=every)
    return mixer_pick(_mixer_logits(dots, constants, bias), available, k, all_available=every)


def _gate_compiled(columns: SlotColumns, shrunk: torch.Tensor, x: torch.Tensor, request: torch.Tensor | None) -> None:
    """What :func:`gate_slot` does for a routed slot, its top-k and weighting in one compiled loop
    (``serving/mixture/fused.py``) over ``shrunk`` itself: the same scores as :func:`_pick`'s, handed over before the
    top-k (Arrow's without a bias are the router columns as they are)."""
    routing, tokens = columns.routing, shrunk.shape[0]
    bias = _request_bias(routing, request, tokens, shrunk.dtype)
    temperature = routing.temperature if routing.kind == "arrow" else 1.0
    if routing.kind == "arrow" and bias is None:
        fused.top_k_gate_(
            shrunk, columns.start, shrunk, columns.lora_stop, columns.compiled, fused.ABS_SOFTMAX, temperature
        )
        return
    dots = _router_dots(columns, shrunk[:, columns.start : columns.stop])
    if routing.kind == "arrow":
        assert bias is not None  # Arrow without a bias was handed over above
        scores, transform = dots.abs() + bias, fused.SOFTMAX
    elif routing.kind == "phatgoose":
        scores, transform = _phatgoose_scores(dots, x, columns.constants), fused.SOFTMAX
        if bias is not None:
            scores = scores + bias
    else:
        scores, transform = _mixer_logits(dots, columns.constants, bias), fused.SIGMOID
    flat = scores.reshape(tokens, -1)
    fused.top_k_gate_(shrunk, columns.start, flat, 0, columns.compiled, transform, temperature)


def request_rows(
    extra_args: Sequence[Mapping[str, Any] | None], tokens_per_request: Sequence[int]
) -> torch.Tensor | None:
    """Each scheduled token's request vector [tokens, widest] (NaN where its request brought none), from the
    batch's requests' ``extra_args`` in batch order and their scheduled token counts; None when none brought one
    (the usual case: nothing is built). A vector that is not a list of at most ``MAX_MEMBERS`` finite numbers
    counts as none (the gateway checks what it sends; vLLM's own clients could send anything)."""
    vectors: list[list[float] | None] = []
    for args in extra_args:
        raw = args.get(REQUEST_KEY) if args else None
        ok = (
            isinstance(raw, list)
            and 0 < len(raw) <= MAX_MEMBERS
            and all(isinstance(v, int | float) and math.isfinite(v) for v in raw)
        )
        vectors.append([float(v) for v in raw] if ok else None)  # type: ignore[union-attr]
    if not any(v is not None for v in vectors):
        return None
    width = max(len(v) for v in vectors if v is not None)
    counts = [int(c) for c in tokens_per_request[: len(vectors)]]
    rows = torch.full((sum(counts), width), float("nan"))
    start = 0
    for vector, count in zip(vectors, counts, strict=False):
        if vector is not None:
            rows[start : start + count, : len(vector)] = torch.tensor(vector)
        start += count
    return rows


def fit_rows(request: torch.Tensor, tokens: int, width: int | None = None) -> torch.Tensor:
    """``request`` cut or NaN-padded to ``tokens`` rows (and ``width`` columns): vLLM pads a batch's tokens,
    and a batch's vectors are as wide as its widest."""
    rows, cols = request.shape
    width = cols if width is None else width
    if rows >= tokens and cols >= width:
        return request[:tokens, :width]
    padded = request.new_full((tokens, width), float("nan"))
    padded[: min(rows, tokens), : min(cols, width)] = request[:tokens, :width]
    return padded


def gate_slot(columns: SlotColumns, shrunk: torch.Tensor, x: torch.Tensor, request: torch.Tensor | None) -> None:
    """Multiply, in place, the slot's LoRA columns of ``shrunk`` [tokens, >= stop] by each token's member weights
    (its router columns stay: no B product reads them)."""
    if columns.routing.routed and shrunk.dtype == torch.float32 and shrunk.device.type == "cpu" and fused.available():
        _gate_compiled(columns, shrunk, x, request)
        return
    gates = slot_gates(columns, shrunk[:, columns.start : columns.stop], x, request)
    lora = shrunk[:, columns.start : columns.lora_stop]
    rank = columns.equal_rank
    if rank is None:
        lora.mul_(gates.index_select(1, columns.gather))
        return
    # members alike: each member's columns are one block of a view, scaled by its gate in place (no widened copy);
    # a routed slot's gates differ per slice ([tokens, slices * n]), a weighted slot's do not ([tokens, n])
    tokens, members = shrunk.shape[0], columns.routing.members
    lora.view(tokens, columns.slices, members, rank).mul_(gates.view(tokens, -1, members, 1))
