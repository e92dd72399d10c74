"""Multi-LoRA shrink / expand for vLLM's CPU punica wrapper, without per-token weight copies.

vLLM's CPU path (``vllm.lora.ops.torch_ops``) gathers every token's own copy of its adapter's A and B
(``weights[indices]``) before an einsum: about 10 MB per token per forward pass for SmolLM2-135M at rank 8,
which made LoRA prefill run at half the base model's speed here. These functions compute the same result
with plain matrix products:

- few adapter slots (slots x rank small): one product against every slot's stacked weights, then each
  token keeps its own slot's columns (shrink) or feeds only its own slot's rows (expand). The extra
  FLOPs are slots x rank per token, far below the base model's, and the shapes never depend on the data;
- many slots: tokens are grouped by adapter and each group does one product with its adapter's weights.

Linear layers skip the per-slice ops altogether: ``add_lora_linear`` replaces the wrapper's method of that name
and runs a whole (packed) layer as two products over the active slots' stacked weights (see below); in vLLM's
compiled model the same work is a plan per layer (:func:`linear_plan`, :func:`apply_linear_plan`). With one
adapter an eager decode step costs 11-16% more than the base model's at batch 1 and 16, against 81-110% with
vLLM's own ops (``bench/vllm_lora_step.py``, bench/RESULTS.md).

Semantics follow vLLM's reference ops exactly (same arguments, same in-place writes); an index of -1 means
"no adapter" and contributes nothing. Pure tensor functions: ``serving/vllm_plugin.py`` installs them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, NamedTuple

import torch

from serving.mixture.slot import SlotColumns, SlotRouting, fit_rows, gate_slot, slot_columns

log = logging.getLogger(__name__)

# Above this many stacked columns (slots x rank) grouping by adapter beats the all-slots product.
DENSE_SLOT_COLUMNS = 256
# A packed layer's B (q/k/v: 3 output slices, gate/up: 2) goes in one product over a block matrix when tokens x
# columns a slice is at most BLOCK_PRODUCT_WORK and the block has at most BLOCK_PRODUCT_ELEMENTS, else one product
# per slice: one op instead of several pays for the zeros multiplied, and read from memory every step, only when
# both are few. Measured in a decode step's 120 layers (weights not in cache): a plain rank-8 adapter's blocks
# (23k / 49k elements) saved ~0.5 ms a step at 1-16 tokens; a six-member mixture's (155k / 332k) cost 1-4 ms.
BLOCK_PRODUCT_WORK = 768
BLOCK_PRODUCT_ELEMENTS = 65536


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM keeps LoRA weights as [slots, 1, rows, cols] or [slots, rows, cols]; return the 3-D view."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


# --- caches between mapping updates ----------------------------------------------------------------------
# A decode step calls these ops 2 x 7 x layers times (420 for SmolLM2) with the same token indices and the
# same weights, and at a few tokens per step the cost is Python and op dispatch, not arithmetic. So what
# depends only on the indices (a token x slot one-hot) is built once, and the expand weights' [slots * rank,
# out] layout once per adapter layout. vLLM refills its index buffers and slot weights in place, and only
# then calls the punica wrapper's ``update_metadata`` (serving/vllm_plugin.py hooks it to call
# :func:`mapping_updated`), so entries live until that call. Entries match on the source's address, shape,
# strides and dtype, and hold the source. Without the hook (ops called on their own) nothing is cached.


@dataclass
class _Derived:
    source: torch.Tensor  # held so its memory cannot be freed and reused by another tensor while cached
    value: Any


class _Caches:
    enabled = False
    slot_layout: tuple[int | None, ...] | None = None
    one_hot: dict[tuple[Any, ...], _Derived] = {}
    per_token: dict[tuple[Any, ...], _Derived] = {}
    expand_weights: dict[tuple[Any, ...], _Derived] = {}
    zero: dict[tuple[Any, ...], _Derived] = {}
    routing: dict[tuple[Any, ...], _Derived] = {}
    packed: dict[tuple[Any, ...], _Derived] = {}
    packed_bytes = 0


# Plans per layer (keyed by the caller: serving/vllm_compile.py's layer keys), valid until the next mapping
# update, so a decode step costs one lookup and two products per LoRA layer. Filled only while the caches are
# enabled (the update hook is installed), else nothing would ever clear it.
LAYER_PLANS: dict[int, LinearPlan | None] = {}


# Mixture slots (serving/mixture/slot.py) by vLLM's LoRA id, registered when vLLM loads their folder
# (serving/vllm_plugin.py), and each token's per-request vector for them ([tokens, members], NaN where a request
# brought none), set before every forward pass: both read by the layers' plans below.
MIXTURE_SLOTS: dict[int, SlotRouting] = {}


class _Requests:
    rows: torch.Tensor | None = None


def register_mixture(lora_id: int, routing: SlotRouting | None) -> None:
    """vLLM loaded adapter ``lora_id``: a mixture slot with this routing, or (None) a plain adapter."""
    if routing is None:
        MIXTURE_SLOTS.pop(lora_id, None)
    else:
        MIXTURE_SLOTS[lora_id] = routing


def set_request_rows(rows: torch.Tensor | None) -> None:
    """The batch's per-token request vectors for mixture slots (None: no request brought one)."""
    _Requests.rows = rows


def _slot_routing(slot: int) -> SlotRouting | None:
    layout = _Caches.slot_layout
    if not MIXTURE_SLOTS or layout is None or slot >= len(layout):
        return None
    lora_id = layout[slot]
    return None if lora_id is None else MIXTURE_SLOTS.get(lora_id)


def mapping_updated(slot_layout: Sequence[int | None]) -> None:
    """vLLM refilled the LoRA index buffers (and, when ``slot_layout`` changed, the slots' weights)."""
    _Caches.enabled = True
    _Caches.one_hot.clear()
    _Caches.per_token.clear()
    _Caches.routing.clear()
    LAYER_PLANS.clear()
    if tuple(slot_layout) != _Caches.slot_layout:
        _Caches.expand_weights.clear()
        _Caches.zero.clear()
        _Caches.packed.clear()
        _Caches.packed_bytes = 0
        _Caches.slot_layout = tuple(slot_layout)


def _cached(
    cache: dict[tuple[Any, ...], _Derived], tensor: torch.Tensor, extra: Any = None
) -> tuple[Any, tuple[Any, ...]]:
    """(value or None, key) for what was derived from ``tensor``'s memory since the last mapping update.

    Keyed by address, not by tensor object: vLLM hands the ops a fresh view of its buffers on every call, and
    under ``torch.inference_mode`` a view does not record its base, so object identity never repeats.
    """
    key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, extra)
    entry = cache.get(key) if _Caches.enabled else None
    return (entry.value if entry is not None else None), key


def _remember(cache: dict[tuple[Any, ...], _Derived], key: tuple[Any, ...], tensor: torch.Tensor, value: Any) -> Any:
    if _Caches.enabled:
        cache[key] = _Derived(tensor, value)
    return value


def _one_hot(indices: torch.Tensor, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, slots]: 1 where the token uses that slot; an all-zero row for index -1 (no adapter)."""
    hot, key = _cached(_Caches.one_hot, indices, (slots, dtype))
    if hot is not None:
        return hot  # type: ignore[no-any-return]
    hot = (indices.view(-1, 1) == torch.arange(slots, device=indices.device)).to(dtype)
    return _remember(_Caches.one_hot, key, indices, hot)  # type: ignore[no-any-return]


def _expand_weights(weights: torch.Tensor) -> torch.Tensor:
    """[slots, out, rank] -> [slots * rank, out], so one product covers every slot."""
    flat, key = _cached(_Caches.expand_weights, weights)
    if flat is not None:
        return flat  # type: ignore[no-any-return]
    slots, out_dim, rank = weights.shape
    flat = weights.permute(0, 2, 1).reshape(slots * rank, out_dim).contiguous()
    return _remember(_Caches.expand_weights, key, weights, flat)  # type: ignore[no-any-return]


def _all_zero(weights: torch.Tensor) -> bool:
    """Whether every slot's weights are zeros: vLLM keeps LoRA buffers for modules no loaded adapter adapts (the
    logits' lm_head among them, vocabulary wide), and multiplying by them every step costs milliseconds for nothing."""
    zero, key = _cached(_Caches.zero, weights)
    if zero is not None:
        return bool(zero)
    return bool(_remember(_Caches.zero, key, weights, not bool(weights.any())))


def _token_indices(indices: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each of ``tokens`` rows' adapter index. vLLM's logits for prompt log-probabilities run one request's prompt
    rows against the batch's per-request sampler indices: fewer indices than rows. One adapter for them all is
    that request's; indices that differ cannot be told apart, and those rows get no LoRA (logged) rather than
    crash the engine (vLLM's own CPU op fails there)."""
    if indices.shape[0] >= tokens:
        return indices[:tokens]
    first = indices[:1]
    if indices.shape[0] > 0 and bool((indices == first).all()):
        return first.expand(tokens)
    log.warning(
        "LoRA ops: %d rows against %d adapter indices that differ: rows computed without LoRA", tokens, len(indices)
    )
    return indices.new_full((tokens,), -1)


def _grouped_product(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], tokens grouped by adapter (many slots x rank); zero for -1."""
    out = inputs.new_zeros(inputs.shape[0], weights.shape[1])
    indices = _token_indices(indices, inputs.shape[0])
    for slot in torch.unique(indices[indices >= 0]).tolist():
        members = (indices == slot).nonzero(as_tuple=True)[0]
        out[members] = inputs[members] @ weights[slot].T
    return out


def _shrunk(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[tokens, rank]: each token times its own adapter's A (weights [slots, rank, in])."""
    slots, rank, in_dim = weights.shape
    if slots * rank > DENSE_SLOT_COLUMNS:
        return _grouped_product(inputs, weights, indices)
    tokens = inputs.shape[0]
    every_slot = (inputs @ weights.reshape(slots * rank, in_dim).T).view(tokens, slots, rank)
    hot = _one_hot(_token_indices(indices, tokens), slots, inputs.dtype)
    return torch.bmm(hot.unsqueeze(1), every_slot).view(tokens, rank)


def _expand_into(
    target: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, add: bool
) -> None:
    """target (+)= each token's rank values times its own adapter's B (weights [slots, out, rank]); the
    target is ``width`` wide, at most the adapter's out."""
    slots, _, rank = weights.shape
    width = target.shape[1]
    if _Caches.enabled and _all_zero(weights):  # cached between mapping updates; uncached it would cost a pass
        if not add:
            target.zero_()
        return
    if inputs.shape[0] == 1 and target.shape[0] != 1:  # vLLM's reference op broadcasts a single row
        indices = indices[:1]
    if slots * rank > DENSE_SLOT_COLUMNS:
        product = _grouped_product(inputs, weights, indices)[:, :width]
    else:
        tokens = inputs.shape[0]
        blocks = (
            _one_hot(_token_indices(indices, tokens), slots, inputs.dtype).unsqueeze(2) * inputs.unsqueeze(1)
        ).view(tokens, slots * rank)
        flat = _expand_weights(weights)[:, :width]
        if add and tokens == target.shape[0]:
            target.addmm_(blocks, flat)
            return
        product = blocks @ flat
    if add:
        target += product
    else:
        target.copy_(product.expand_as(target))


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    weights = _stacked(lora_a_weights).to(output_tensor.dtype)
    if _Caches.enabled and _all_zero(weights):  # nothing adapts this module (vLLM's lm_head buffers, mostly)
        output_tensor[:, : weights.shape[1]].zero_()
        return
    shrunk = _shrunk(inputs.to(output_tensor.dtype), weights, lora_indices_tensor)
    if scaling != 1.0:
        shrunk.mul_(scaling)
    output_tensor[:, : shrunk.shape[1]].copy_(shrunk)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    weights = _stacked(lora_b_weights).to(output_tensor.dtype)
    # Adapter and model may pad their output widths differently.
    width = min(weights.shape[1], output_tensor.shape[1])
    _expand_into(output_tensor[:, :width], inputs.to(output_tensor.dtype), weights, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    weights = _stacked(lora_b_weights).to(output_tensor.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    _expand_into(target, inputs.to(output_tensor.dtype), weights, lora_indices_tensor, add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """Each prefill token's adapter index (one tensor between mapping updates, so its one-hot is cached)."""
    per_token, key = _cached(_Caches.per_token, lora_indices_tensor, seq_len_tensor.data_ptr())
    if per_token is not None:
        return per_token  # type: ignore[no-any-return]
    per_token = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    return _remember(_Caches.per_token, key, lora_indices_tensor, per_token)  # type: ignore[no-any-return]


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


# --- a whole LoRA linear layer in two products ------------------------------------------------------------
# vLLM's CPU wrapper runs a packed layer (qkv: 3 slices, gate_up: 2) as one shrink and one expand per slice,
# each a Python op with its own dispatch: 12 ops a decoder layer, where at one token per step the arithmetic
# is a few microseconds. ``add_lora_linear`` packs the active slots' A of every slice into one matrix, so a layer
# is x @ A.T then one addmm per output slice (or, for few tokens and columns, one over a block matrix of the
# slices' B). Per slice, a six-member mixture's decode step at batch 16 cost 15 ms of LoRA work instead of 19.

# Packed weights are kept per layer and set of active slots (about 15 MB per slot for SmolLM2-135M at rank 8,
# 8x that at rank 64); past this many bytes the cache starts afresh, which bounds memory when batches keep
# changing their mix of adapters.
PACKED_CACHE_BYTES = 512 * 1024 * 1024


@dataclass
class _Routing:
    """How one mapping's tokens use the adapter slots."""

    slots: tuple[int, ...]  # active slots, ascending
    uniform: bool  # every token uses slots[0]: no mask needed
    hot: torch.Tensor  # [tokens, len(slots)] 1 where the token uses that slot (float32)
    members: tuple[torch.Tensor, ...]  # per active slot, its token rows
    masks: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor]  # hot widened to each slot's packed columns


def _routing(indices: torch.Tensor, tokens: int) -> _Routing:
    routing, key = _cached(_Caches.routing, indices, tokens)
    if routing is not None:
        return routing  # type: ignore[no-any-return]
    known = indices[:tokens]
    slots = tuple(int(s) for s in torch.unique(known).tolist() if s >= 0)
    hot = torch.zeros(tokens, len(slots))
    if slots:
        hot[: known.shape[0]] = (known.view(-1, 1) == torch.tensor(slots, device=known.device)).to(hot.dtype)
    uniform = len(slots) == 1 and known.shape[0] == tokens and bool(torch.all(known == slots[0]))
    members = tuple(hot[:, j].nonzero(as_tuple=True)[0] for j in range(len(slots)))
    return _remember(_Caches.routing, key, indices, _Routing(slots, uniform, hot, members, {}))  # type: ignore[no-any-return]


class SliceProduct(NamedTuple):
    """One output slice's B product: ``y[:, out] += shrunk[:, columns] @ b``."""

    columns: slice | torch.Tensor  # shrunk's columns that feed the slice (a view when they are contiguous)
    b: torch.Tensor  # [len(columns), width]
    out: slice  # the slice's output columns


@dataclass
class _Packed:
    a_t: torch.Tensor  # [in, columns]: every active slot's A rows (slot-major, slice after slice), transposed
    slices: tuple[SliceProduct, ...]  # per output slice, every active slot's columns and B rows for it
    per_slot: tuple[tuple[SliceProduct, ...], ...]  # per active slot, its slices (columns counted from its start)
    columns: tuple[int, ...]  # columns per active slot (its used rank, summed over slices)
    mixtures: tuple[SlotColumns | None, ...]  # per active slot: where a mixture slot's columns are, else None
    block: torch.Tensor | None = None  # [columns, width]: the slices' B as one block matrix, built when first used

    @cached_property
    def width(self) -> int:
        """Output columns the slices cover."""
        return max(p.out.stop for p in self.slices)

    def block_matrix(self) -> torch.Tensor:
        """Every slice's B in one matrix (zero rows for router columns, zeros off each slice's outputs)."""
        if self.block is None:
            block = self.a_t.new_zeros(self.a_t.shape[1], self.width)
            for columns, b, out in self.slices:
                block[columns, out] = b
            self.block = block
        return self.block


def _used_rank(a: torch.Tensor) -> int:
    """Rows of one slot's A [rank, in] up to its last nonzero row. vLLM pads an adapter of a smaller rank than
    --max-lora-rank with zero rows (a server with one rank-64 adapter pads every rank-8 one 8x); a zero row of A
    contributes nothing, so it is left out of the products."""
    nonzero = (a != 0).any(dim=1).nonzero()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


def _columns(ranges: Sequence[tuple[int, int]]) -> slice | torch.Tensor:
    """Column ranges as one slice when they follow each other, else an index tensor."""
    if all(stop == ranges[i + 1][0] for i, (_, stop) in enumerate(ranges[:-1])):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.cat([torch.arange(start, stop) for start, stop in ranges])


def _packed(
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    slots: tuple[int, ...],
    dtype: torch.dtype,
) -> _Packed:
    """The active slots' A of every slice stacked, and per slice their B rows (see :class:`_Packed`), padding rows
    dropped. B is kept per slice: in one block matrix a slice's rows are multiplied by the zeros of every other
    slice's outputs (two thirds of a q/k/v product, half of a gate/up one), which pays only for few tokens and
    columns (:data:`BLOCK_PRODUCT_WORK`, :data:`BLOCK_PRODUCT_ELEMENTS`)."""
    first = lora_a_stacked[0]
    packed, key = _cached(_Caches.packed, first, (lora_b_stacked[0].data_ptr(), slots, dtype))
    if packed is not None:
        return packed  # type: ignore[no-any-return]
    a_parts: list[torch.Tensor] = []
    columns: list[int] = []
    mixtures: list[SlotColumns | None] = []
    per_slot: list[tuple[SliceProduct, ...]] = []
    # per output slice: (column range, B rows [rank, width]) of every slot that adapts it
    by_slice: list[list[tuple[tuple[int, int], torch.Tensor]]] = [[] for _ in output_slices]
    outs: list[slice] = []
    start = 0
    for slot in slots:
        offset, used_columns = 0, 0
        routing = _slot_routing(slot)
        slot_b: list[torch.Tensor] = []
        router_rows: list[torch.Tensor] = []
        own: list[SliceProduct] = []
        outs = []
        for s, (a_stacked, b_stacked, width) in enumerate(
            zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True)
        ):
            full = _stacked(a_stacked)[slot]  # [rank, in]
            # a mixture slot keeps its whole layout (its router rows are read, its zero rows are members' padding)
            rank = routing.lora_columns if routing is not None else _used_rank(full)
            a = full[:rank].to(dtype)
            b = _stacked(b_stacked)[slot][:, :rank].to(dtype)  # [out, rank]
            used = min(width, b.shape[0])
            outs.append(slice(offset, offset + used))
            if rank:
                b_rows = b[:used].T.contiguous()
                by_slice[s].append(((start + used_columns, start + used_columns + rank), b_rows))
                own.append(SliceProduct(slice(used_columns, used_columns + rank), b_rows, outs[-1]))
            if routing is not None:
                slot_b.append(_stacked(b_stacked)[slot][:, : routing.rank].to(dtype))
                router_rows.append(full[routing.lora_columns : routing.rank].to(dtype))
            a_parts.append(a)
            offset += width
            used_columns += rank
        if routing is not None:  # every slice's router rows after the LoRA rows: the router's dots in one view
            a_parts += router_rows
            used_columns += sum(r.shape[0] for r in router_rows)
        mixtures.append(None if routing is None else slot_columns(routing, start, slot_b))
        columns.append(used_columns)
        per_slot.append(tuple(own))
        start += used_columns
    slices = tuple(
        SliceProduct(_columns([r for r, _ in parts]), torch.cat([b for _, b in parts]), outs[s])
        for s, parts in enumerate(by_slice)
        if parts
    )
    packed = _Packed(torch.cat(a_parts).T.contiguous(), slices, tuple(per_slot), tuple(columns), tuple(mixtures))
    # with several slices a block matrix may be built too, at least as large as their B together
    b_bytes = sum(p.b.numel() * p.b.element_size() for p in slices) * (2 if len(slices) > 1 else 1)
    size = packed.a_t.numel() * packed.a_t.element_size() + b_bytes
    if _Caches.enabled:
        if _Caches.packed_bytes + size > PACKED_CACHE_BYTES:
            _Caches.packed.clear()
            _Caches.packed_bytes = 0
        _Caches.packed_bytes += size
    return _remember(_Caches.packed, key, first, packed)  # type: ignore[no-any-return]


class LinearPlan(NamedTuple):
    """One mapping's LoRA work for one linear layer, ready to apply: per output slice,
    ``y[:, out] += scale * mask(x @ a_t)[:, columns] @ b``."""

    a_t: torch.Tensor  # [in, columns]: the active slots' A rows, transposed
    slices: tuple[SliceProduct, ...]
    scale: float
    mask: torch.Tensor | None  # [tokens, columns]: 1 where the token's slot owns the column; None if uniform
    # many slots: (token rows, columns, its slices, the mixture slot's routing with its columns from 0) per slot
    groups: tuple[tuple[torch.Tensor, slice, tuple[SliceProduct, ...], SlotColumns | None], ...] | None
    tokens: int
    mixtures: tuple[SlotColumns, ...] = ()  # mixture slots among the columns: gated per token before B
    block: torch.Tensor | None = None  # set: the slices' B as one block matrix, applied in one product instead


def linear_plan(
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    scale: float,
    output_slices: Sequence[int],
    token_indices: torch.Tensor,
    tokens: int,
    dtype: torch.dtype,
) -> LinearPlan | None:
    """What :func:`add_lora_linear` does for these weights and this mapping, or None when no token has an
    adapter with nonzero weights here (the layer's output stays as it is)."""
    routing = _routing(token_indices, tokens)
    if not routing.slots:
        return None
    packed = _packed(lora_a_stacked, lora_b_stacked, output_slices, routing.slots, dtype)
    a_t, columns = packed.a_t, packed.columns
    if not packed.slices:  # every active adapter is all zeros here
        return None
    mixtures = tuple(m for m in packed.mixtures if m is not None)
    if not routing.uniform and a_t.shape[1] > DENSE_SLOT_COLUMNS:
        return _grouped_plan(packed, routing, scale, tokens)
    mask = None
    if not routing.uniform:
        mask = routing.masks.get((columns, dtype))
        if mask is None:
            mask = routing.hot.to(dtype).repeat_interleave(torch.tensor(columns), dim=1)
            routing.masks[(columns, dtype)] = mask
    block = None
    slices = len(packed.slices)
    if (
        slices > 1
        and tokens * a_t.shape[1] <= BLOCK_PRODUCT_WORK * slices
        and a_t.shape[1] * packed.width <= BLOCK_PRODUCT_ELEMENTS
    ):
        block = packed.block_matrix()
    elif slices == 1 and packed.slices[0].columns == slice(0, a_t.shape[1]):
        block = packed.slices[0].b  # one slice fed by every column (no router columns): its B is the block
    return LinearPlan(a_t, packed.slices, scale, mask, None, tokens, mixtures, block)


def _grouped_plan(packed: _Packed, routing: _Routing, scale: float, tokens: int) -> LinearPlan:
    groups, start = [], 0
    for rows, count, own, mixture in zip(
        routing.members, packed.columns, packed.per_slot, packed.mixtures, strict=True
    ):
        if own and rows.numel():
            groups.append(
                (rows, slice(start, start + count), own, None if mixture is None else replace(mixture, start=0))
            )
        start += count
    return LinearPlan(packed.a_t, packed.slices, scale, None, tuple(groups), tokens)


def apply_linear_plan(plan: LinearPlan, y: torch.Tensor, x: torch.Tensor) -> None:
    """y (+)= the plan's LoRA term for x ([tokens, in]), in place; y's columns outside the plan's slices untouched."""
    if x.dtype != plan.a_t.dtype:
        x = x.to(plan.a_t.dtype)
    requests = _Requests.rows
    if plan.groups is None:
        shrunk = torch.mm(x, plan.a_t)
        if plan.mask is not None:
            shrunk.mul_(plan.mask)
        for slot_mix in plan.mixtures:
            gate_slot(slot_mix, shrunk, x, requests)
        block = plan.block
        if block is not None:
            (y if y.shape[1] == block.shape[1] else y[:, : block.shape[1]]).addmm_(shrunk, block, alpha=plan.scale)
            return
        for columns, b, out in plan.slices:
            inputs = shrunk[:, columns] if isinstance(columns, slice) else shrunk.index_select(1, columns)
            y[:, out].addmm_(inputs, b, alpha=plan.scale)
        return
    for rows, own_columns, own, mixture in plan.groups:
        rows_x = x.index_select(0, rows)
        shrunk = rows_x @ plan.a_t[:, own_columns]
        if mixture is not None:
            gate_slot(mixture, shrunk, rows_x, None if requests is None else fit_rows(requests, x.shape[0])[rows])
        for columns, b, out in own:
            y[:, out].index_add_(0, rows, shrunk[:, columns] @ b, alpha=plan.scale)


def add_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    scale: float,
    output_slices: Sequence[int],
    token_indices: torch.Tensor,
) -> None:
    """y[:, slice i] += scale * (x @ A_i[slot].T) @ B_i[slot].T for each token's slot (vLLM's
    ``PunicaWrapperBase.add_lora_linear`` semantics); a token with index -1 (or past the indices) is left alone."""
    plan = linear_plan(lora_a_stacked, lora_b_stacked, scale, output_slices, token_indices, x.shape[0], y.dtype)
    if plan is not None:
        apply_linear_plan(plan, y, x)


def remember_layer_plan(key: int, plan: LinearPlan | None) -> None:
    if _Caches.enabled:
        LAYER_PLANS[key] = plan


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}
