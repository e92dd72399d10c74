"""Multi-LoRA shrink / expand for vLLM's CPU punica wrapper, without per-token weight copies.

vLLM's CPU path (``vllm.lora.ops.torch_ops``) gathers every token's own copy of its adapter's A and B
(``weights[indices]``) before an einsum: about 10 MB per token per forward pass for SmolLM2-135M at rank 8,
which made LoRA prefill run at half the base model's speed here. These functions compute the same result
with plain matrix products:

- few adapter slots (slots x rank small): one product against every slot's stacked weights, then each
  token keeps its own slot's columns (shrink) or feeds only its own slot's rows (expand). The extra
  FLOPs are slots x rank per token, far below the base model's, and the shapes never depend on the data;
- many slots: tokens are grouped by adapter and each group does one product with its adapter's weights.

Semantics follow vLLM's reference ops exactly (same arguments, same in-place writes); an index of -1 means
"no adapter" and contributes nothing. Pure tensor functions: ``serving/vllm_plugin.py`` installs them.
"""

from __future__ import annotations

import torch

# Above this many stacked columns (slots x rank) grouping by adapter beats the all-slots product.
DENSE_SLOT_COLUMNS = 256


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM keeps LoRA weights as [slots, 1, rows, cols] or [slots, rows, cols]; return the 3-D view."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _lora_product(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t] for every token t; zero where indices[t] < 0.

    ``weights`` is [slots, out, in], ``inputs`` [tokens, in]; returns [tokens, out].
    """
    slots, out_dim, in_dim = weights.shape
    tokens = inputs.shape[0]
    indices = indices[:tokens].to(torch.long)
    active = indices >= 0
    if slots * out_dim <= DENSE_SLOT_COLUMNS:
        # Shrink (out = rank): every slot's rank columns in one product, then keep the token's own slot.
        every_slot = (inputs @ weights.reshape(slots * out_dim, in_dim).T).view(tokens, slots, out_dim)
        chosen = every_slot.gather(1, indices.clamp(min=0).view(tokens, 1, 1).expand(tokens, 1, out_dim))
        return chosen.squeeze(1) * active.unsqueeze(1).to(inputs.dtype)
    if slots * in_dim <= DENSE_SLOT_COLUMNS:
        # Expand (in = rank): place each token's rank values in its slot's block, one product with all slots.
        blocks = inputs.new_zeros(tokens, slots, in_dim)
        rows = torch.arange(tokens, device=inputs.device)[active]
        blocks[rows, indices[active]] = inputs[active]
        return blocks.view(tokens, slots * in_dim) @ weights.permute(0, 2, 1).reshape(slots * in_dim, out_dim)
    out = inputs.new_zeros(tokens, out_dim)
    for slot in torch.unique(indices[active]).tolist():
        members = (indices == slot).nonzero(as_tuple=True)[0]
        out[members] = inputs[members] @ weights[slot].T
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    weights = _stacked(lora_a_weights).to(output_tensor.dtype)
    outputs = _lora_product(inputs.to(output_tensor.dtype), weights, lora_indices_tensor)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def _write_expanded(
    outputs: torch.Tensor, output_tensor: torch.Tensor, start: int, width: int, add_inputs: bool
) -> None:
    # As vLLM's reference op: one input row is broadcast to every output row.
    rows = outputs[:1] if outputs.shape[0] == 1 else outputs[: output_tensor.shape[0]]
    target = output_tensor[:, start : start + width]
    if add_inputs:
        target += rows[:, :width]
    else:
        target.copy_(rows[:, :width].expand_as(target))


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    weights = _stacked(lora_b_weights).to(output_tensor.dtype)
    outputs = _lora_product(inputs.to(output_tensor.dtype), weights, lora_indices_tensor)
    # Adapter and model may pad their output widths differently.
    _write_expanded(outputs, output_tensor, 0, min(outputs.shape[1], output_tensor.shape[1]), add_inputs)


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
    outputs = _lora_product(inputs.to(output_tensor.dtype), weights, lora_indices_tensor)
    _write_expanded(outputs, output_tensor, slice_offset, slice_size, add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


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


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}
