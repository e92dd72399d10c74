"""Wrap a transformers model's LoRA target linear layers with a routed mixture of stacked adapters.

Every tensor the mixture adds (stacked A/B, scales, router state) is a non-persistent buffer, so it follows
``.to()`` and never enters the checkpoint (what a vLLM out-of-tree model needs later).

Layers that read the same input (q, k, v of an attention block; gate and up of an MLP, the modules vLLM
packs as qkv_proj and gate_up_proj) share one ``SharedInputMixture``: each keeps its own prototypes, routes
and adapters, but the first of them called on an input routes all of them (one score matmul over their
concatenated prototypes, one top-k) and runs all their A sides (one gather, one batched matmul); the others
find that work done for the same input tensor and only add their B sides. Eager per-op overhead dominates at
decode sizes, so fewer, larger ops is what makes the mixture cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from serving.mixture.adapters import LoraAdapter, load_lora_adapter, stack_module, target_linear
from serving.mixture.route import MixtureRouter, Route
from serving.mixture.sparse import LowRank, project_down, project_up

# Leaf names of modules that read the same input tensor (vLLM's packed modules for Llama-like models).
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# After this many calls in a row where a member's input was not the one its group routed, the group stops
# fusing (its members do not share an input in this architecture) and every member routes alone.
MAX_MISSES = 8


class SharedInputMixture(nn.Module):
    """The routing state and A stacks of M MixtureLinear layers reading one input, concatenated: member j's
    adapter e is row j*E + e. Registered under its first member (``shared``) so it follows ``.to()``."""

    A: torch.Tensor  # [M*E, r, in]
    scale: torch.Tensor  # [M*E]
    state: torch.Tensor  # [M*E, in]
    available: torch.Tensor  # [M, E] bool

    def __init__(
        self,
        router: MixtureRouter,
        A: Sequence[torch.Tensor],
        scale: Sequence[torch.Tensor],
        state: Sequence[torch.Tensor],
        available: Sequence[torch.Tensor],
    ) -> None:
        super().__init__()
        self.router = router
        self.register_buffer("A", torch.cat(list(A)), persistent=False)
        self.register_buffer("scale", torch.cat(list(scale)), persistent=False)
        self.register_buffer("state", torch.cat(list(state)), persistent=False)
        self.register_buffer("available", torch.stack(list(available)), persistent=False)
        self.size = len(A)
        self.experts = int(A[0].shape[0])
        self.all_available = bool(self.available.all())
        # Arrow-like routers route all members in one call; others route each member with ``route``.
        self.shared_routing = hasattr(router, "route_shared")
        self.k = router.route_k(self.available) if hasattr(router, "route_k") else None
        self.fused = True
        self.members: list[MixtureLinear] = []  # plain list: the members are modules of the model already
        self._x: torch.Tensor | None = None
        self._low: LowRank | None = None
        self._pending: set[int] = set()
        self._misses = 0

    def rows(self, member: int) -> slice:
        return slice(member * self.experts, (member + 1) * self.experts)

    def lowrank(self, member: int, x: torch.Tensor) -> tuple[LowRank, int]:
        """The A side for ``member`` on ``x``: done now for every member, or found done for this very tensor
        by an earlier member; returns it with the member's index in it."""
        if self._pending:
            if x is self._x and member in self._pending:
                self._pending.discard(member)
                self._misses = 0
                low = self._low
                if not self._pending:
                    self._x, self._low = None, None
                assert low is not None
                return low, member
            self._misses += 1
            if self._misses >= MAX_MISSES:
                self.fused = False
            self._x, self._low, self._pending = None, None, set()
        if self.size == 1 or not self.fused:
            return self._compute(x, [member]), 0
        low = self._compute(x, list(range(self.size)))
        self._x, self._low, self._pending = x, low, set(range(self.size)) - {member}
        return low, member

    def _compute(self, x: torch.Tensor, members: list[int]) -> LowRank:
        flat = x.reshape(-1, x.shape[-1])
        M, E = len(members), self.experts
        if self.size == M:
            state, available, A, scale = self.state, self.available, self.A, self.scale
        else:  # one member alone
            rows = self.rows(members[0])
            state, available, A, scale = (
                self.state[rows],
                self.available[members[0] : members[0] + 1],
                self.A[rows],
                self.scale[rows],
            )
        bias = self._bias(members, flat.shape[0])
        if self.shared_routing:
            experts, weights = self.router.route_shared(  # type: ignore[attr-defined]
                flat, state, available, bias, k=self.k, all_available=self.all_available
            )
        else:
            routes = [
                self.router.route(
                    flat,
                    state[j * E : (j + 1) * E],
                    available[j],
                    None if bias is None else bias[:, min(j, bias.shape[1] - 1)],
                )
                for j in range(M)
            ]
            experts = torch.stack([r.experts for r in routes], dim=1)
            weights = torch.stack([r.weights for r in routes], dim=1)
        for j, m in enumerate(members):
            if self.members[m].record:
                self.members[m].last_route = Route(experts[:, j].contiguous(), weights[:, j].contiguous())
        return project_down(flat, A, scale, experts, weights)

    def _bias(self, members: list[int], tokens: int) -> torch.Tensor | None:
        """[tokens, M or 1, E] from the members' per-sequence ``row_bias`` (None when none has one)."""
        biases = [self.members[m].row_bias for m in members]
        if all(b is None for b in biases):
            return None
        first = biases[0]
        if first is not None and all(b is first for b in biases):
            return _token_bias(first, tokens, self.state.device).unsqueeze(1)
        return torch.stack(
            [
                _token_bias(b, tokens, self.state.device)
                if b is not None
                else self.state.new_zeros(tokens, self.experts)
                for b in biases
            ],
            dim=1,
        )


def _token_bias(row_bias: torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
    """A per-sequence bias [batch, E] repeated for each token of its sequence: [tokens, E]."""
    return row_bias.to(device).repeat_interleave(tokens // row_bias.shape[0], dim=0)


class MixtureLinear(nn.Module):
    """y = W x + Σ_{e in top-k(x)} c_e · scale_e · B_e A_e x, routed per token."""

    Bt: torch.Tensor  # [E, r, out]: B transposed, the layout the B side gathers from
    _group: SharedInputMixture  # kept in __dict__ (see _join)
    _member: int

    def __init__(
        self,
        name: str,
        base: nn.Linear,
        adapters: Sequence[LoraAdapter],
        router: MixtureRouter,
        states: Sequence[dict[str, torch.Tensor]],
    ) -> None:
        super().__init__()
        self.name = name
        self.base = base
        self.router = router
        dtype = base.weight.dtype
        stack = stack_module(adapters, name, base.in_features, base.out_features, dtype)
        self.ranks = stack.ranks
        state = torch.zeros(len(adapters), router.state_width(base.in_features), dtype=torch.float32)
        for e, s in enumerate(states):
            if name in s:
                state[e] = s[name]
        device = base.weight.device
        self.register_buffer("Bt", stack.B.transpose(1, 2).contiguous().to(device), persistent=False)
        group = SharedInputMixture(
            router, [stack.A.to(device)], [stack.scale.to(device)], [state.to(device)], [stack.available.to(device)]
        )
        self._join(group, 0)
        self.record = False  # when True, keep the last forward's route in ``last_route`` (traces, tests)
        self.last_route: Route | None = None
        # Per-sequence router bias [batch, E] (GLIDER), set by the engine around a batch; None = no bias.
        self.row_bias: torch.Tensor | None = None

    def _join(self, group: SharedInputMixture, member: int) -> None:
        """Become ``member`` of ``group``; the group is registered (``shared``) under its first member only,
        the others hold a plain reference."""
        if "shared" in self._modules:
            del self._modules["shared"]
        if member == 0:
            self.add_module("shared", group)
        self.__dict__["_group"] = group
        self.__dict__["_member"] = member
        if len(group.members) <= member:
            group.members.extend([self] * (member + 1 - len(group.members)))
        group.members[member] = self

    @property
    def group(self) -> SharedInputMixture:
        return self._group

    @property
    def A(self) -> torch.Tensor:  # [E, r, in]
        return self.group.A[self.group.rows(self._member)]

    @property
    def B(self) -> torch.Tensor:  # [E, out, r]
        return self.Bt.transpose(1, 2)

    @property
    def scale(self) -> torch.Tensor:  # [E]
        return self.group.scale[self.group.rows(self._member)]

    @property
    def state(self) -> torch.Tensor:  # [E, in]: this module's router state
        return self.group.state[self.group.rows(self._member)]

    @property
    def available(self) -> torch.Tensor:  # [E] bool
        return self.group.available[self._member]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        low, j = self.group.lowrank(self._member, x)
        if y.dtype == low.z.dtype and y.is_contiguous():  # add the B side straight into the base output
            project_up(low, j, self.Bt, y.view(-1, y.shape[-1]))
            return y
        delta = project_up(low, j, self.Bt, low.z.new_zeros(x.numel() // x.shape[-1], self.Bt.shape[2]))
        return y + delta.view(*x.shape[:-1], delta.shape[-1]).to(y.dtype)


def fuse_shared_inputs(
    layers: dict[str, MixtureLinear], shared: Iterable[Sequence[str]] = SHARED_INPUTS
) -> list[SharedInputMixture]:
    """Put the layers of one parent whose leaf names form a ``shared`` set (and whose adapters cover them
    alike) in one SharedInputMixture; returns the groups made. Exact: every member keeps its own route."""
    by_parent: dict[tuple[str, tuple[str, ...]], list[MixtureLinear]] = {}
    for path, layer in sorted(layers.items()):
        parent, _, leaf = path.rpartition(".")
        for names in shared:
            if leaf in names:
                by_parent.setdefault((parent, tuple(names)), []).append(layer)
    groups = []
    for members in by_parent.values():
        first = members[0].group
        if len(members) < 2 or not all(
            m.group.size == 1
            and m.router is members[0].router
            and m.in_features == members[0].in_features
            and m.group.A.shape == first.A.shape
            and torch.equal(m.group.available, first.available)
            for m in members
        ):
            continue
        if not hasattr(members[0].router, "route_shared"):
            continue
        group = SharedInputMixture(
            members[0].router,
            [m.group.A for m in members],
            [m.group.scale for m in members],
            [m.group.state for m in members],
            [m.group.available[0] for m in members],
        )
        for j, m in enumerate(members):
            m._join(group, j)
        groups.append(group)
    return groups


def apply_mixture(
    model: nn.Module,
    adapters: Sequence[LoraAdapter],
    router: MixtureRouter,
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
        target_linear(model, module, next(a.name for a in adapters if module in a.modules))
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
    fuse_shared_inputs(wrapped)
    return wrapped


def load_mixture_model(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    router: MixtureRouter,
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
