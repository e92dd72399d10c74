"""Wrap a transformers model's LoRA target linear layers with a routed mixture of stacked adapters.

Every tensor the mixture adds (stacked A/B, scales, router state) is a non-persistent buffer, so it follows
``.to()`` and never enters the checkpoint (what a vLLM out-of-tree model needs later).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from routers.token.adapters import LoraAdapter, load_lora_adapter, refused, stack_module
from routers.token.base import Route, TokenRouter
from routers.token.mixture import sparse_lora_delta


class MixtureLinear(nn.Module):
    """y = W x + Σ_{e in top-k(x)} c_e · scale_e · B_e A_e x, routed per token."""

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    state: torch.Tensor
    available: torch.Tensor

    def __init__(
        self,
        name: str,
        base: nn.Linear,
        adapters: Sequence[LoraAdapter],
        router: TokenRouter,
        states: Sequence[dict[str, torch.Tensor]],
    ) -> None:
        super().__init__()
        self.name = name
        self.base = base
        self.router = router
        dtype = base.weight.dtype
        stack = stack_module(adapters, name, base.in_features, base.out_features, dtype)
        self.ranks = stack.ranks
        state = torch.zeros(len(adapters), base.in_features, dtype=torch.float32)
        for e, s in enumerate(states):
            if name in s:
                state[e] = s[name]
        device = base.weight.device
        self.register_buffer("A", stack.A.to(device), persistent=False)
        self.register_buffer("B", stack.B.to(device), persistent=False)
        self.register_buffer("scale", stack.scale.to(device), persistent=False)
        self.register_buffer("state", state.to(device), persistent=False)
        self.register_buffer("available", stack.available.to(device), persistent=False)
        self.record = False  # when True, keep the last forward's route in ``last_route`` (traces, tests)
        self.last_route: Route | None = None
        # Per-sequence router bias [batch, E] (GLIDER), set by the engine around a batch; None = no bias.
        self.row_bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        bias = None
        if self.row_bias is not None:  # [batch, E] -> one row per token of each sequence
            bias = self.row_bias.to(flat.device).repeat_interleave(flat.shape[0] // self.row_bias.shape[0], dim=0)
        route = self.router.route(flat, self.state, self.available, bias)
        if self.record:
            self.last_route = route
        delta = sparse_lora_delta(flat, self.A, self.B, self.scale, route.experts, route.weights, self.ranks)
        return y + delta.view(*x.shape[:-1], delta.shape[-1]).to(y.dtype)


def apply_mixture(
    model: nn.Module,
    adapters: Sequence[LoraAdapter],
    router: TokenRouter,
    states: Sequence[dict[str, torch.Tensor]] | None = None,
) -> dict[str, MixtureLinear]:
    """Replace, in place, every linear layer any adapter targets with a MixtureLinear; returns them by
    module path. ``states`` (one per adapter, e.g. stored ones from ``routers.token.states``) are used as
    given; without them each adapter's state is fitted here (``router.fit_adapter``, which a router that
    trains on data cannot do without its FitContext)."""
    if not adapters:
        raise ValueError("a token-level mixture needs at least one adapter")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}")
    targets = sorted({m for a in adapters for m in a.modules})
    for module in targets:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            owner = next(a.name for a in adapters if module in a.modules)
            what = "absent from the base" if layer is None else f"a {type(layer).__name__}, not a Linear"
            raise refused(owner, f"it targets {module}, which is {what}")
    if states is None:
        states = [router.fit_adapter(a) for a in adapters]
    elif len(states) != len(adapters):
        raise ValueError(f"give one router state per adapter ({len(adapters)}), got {len(states)}")
    wrapped: dict[str, MixtureLinear] = {}
    for module in targets:
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        wrapped[module] = MixtureLinear(module, base, adapters, router, states)
        setattr(parent, leaf, wrapped[module])
    return wrapped


def load_mixture_model(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    router: TokenRouter,
    *,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    states: Sequence[dict[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, dict[str, MixtureLinear]]:
    """A causal LM from ``base_dir`` with the adapters in ``adapter_dirs`` mixed per token by ``router``."""
    from transformers import AutoModelForCausalLM

    if names is not None and len(names) != len(adapter_dirs):
        raise ValueError("give one name per adapter folder")
    adapters = [load_lora_adapter(path, None if names is None else names[i]) for i, path in enumerate(adapter_dirs)]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    model.eval()
    return model, apply_mixture(model, adapters, router, states)
