"""The fast path of the token-level mixture: modules reading one input (q/k/v, gate/up) share a
SharedInputMixture that routes them together and runs their A sides in one batched op. It must give exactly
what routing each module alone gives (same routes, same outputs), in both layouts (gathered for few tokens,
grouped for many), for batches whose sequences take different routes, with GLIDER's row bias, and when a
member is called on some other input; and it must still compute only the chosen experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from routers.token import TOKEN_ROUTERS, MixtureLinear, load_lora_adapter, load_mixture_model
from routers.token.arrow import ArrowConfig, ArrowRouter
from routers.token.base import Route, TokenRouter
from serving.mixture import layer as model_mod
from serving.mixture import sparse as mixture_mod
from serving.mixture.layer import MAX_MISSES, SharedInputMixture, apply_mixture
from serving.mixture.sparse import dense_lora_delta, project_down, project_up
from tests.fixtures.tiny import build_tiny_lora

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def experts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("shared-experts")
    return [build_tiny_lora(tiny_base, root / f"e{i}", r=4, alpha=8, target_modules=ALL, seed=40 + i) for i in range(5)]


def _arrow(top_k: int = 2) -> ArrowRouter:
    router = TOKEN_ROUTERS.build("arrow", {"top_k": top_k})
    assert isinstance(router, ArrowRouter)
    return router


def _models(tiny_base: Path, experts: list[Path], monkeypatch: pytest.MonkeyPatch, top_k: int = 2) -> tuple[Any, ...]:
    """The same mixture twice: fused (the default) and with every module routed alone."""
    fused, fused_layers = load_mixture_model(tiny_base, experts, _arrow(top_k))
    with monkeypatch.context() as m:
        m.setattr(model_mod, "fuse_shared_inputs", lambda layers, shared=(): [])
        alone, alone_layers = load_mixture_model(tiny_base, experts, _arrow(top_k))
    for layer in [*fused_layers.values(), *alone_layers.values()]:
        layer.record = True
    return fused, fused_layers, alone, alone_layers


def _ids(seed: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(4, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _same_routes(a: dict[str, MixtureLinear], b: dict[str, MixtureLinear]) -> None:
    for name in a:
        ra, rb = a[name].last_route, b[name].last_route
        assert ra is not None and rb is not None, name
        assert torch.equal(ra.experts, rb.experts), name
        torch.testing.assert_close(ra.weights, rb.weights, atol=1e-6, rtol=1e-5)


def test_groups_are_q_k_v_and_gate_up(tiny_base: Path, experts: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, layers, _, alone_layers = _models(tiny_base, experts, monkeypatch)
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = {layers[f"{attn}.{leaf}"].group for leaf in ("q_proj", "k_proj", "v_proj")}
        gate_up = {layers[f"{mlp}.{leaf}"].group for leaf in ("gate_proj", "up_proj")}
        assert len(qkv) == 1 and next(iter(qkv)).size == 3
        assert len(gate_up) == 1 and next(iter(gate_up)).size == 2
        assert layers[f"{attn}.o_proj"].group.size == 1 and layers[f"{mlp}.down_proj"].group.size == 1
    assert all(layer.group.size == 1 for layer in alone_layers.values())
    # Each member still shows its own stacks: views of the group's concatenation.
    q = layers["model.layers.0.self_attn.q_proj"]
    adapter = load_lora_adapter(experts[3])
    w = adapter.modules[q.name]
    torch.testing.assert_close(q.B[3] @ q.A[3], w.B @ w.A, atol=0, rtol=0)
    assert float(q.scale[3]) == w.scale and q.available.all()
    # Registered once (under its first member), so .to() and named_buffers see each tensor once.
    names = [n for n, _ in next(iter(qkv)).named_buffers()]
    members = [layers[f"model.layers.0.self_attn.{leaf}"] for leaf in ("q_proj", "k_proj", "v_proj")]
    assert sum(1 for m in members for n, _ in m.named_modules() if n == "shared") == 1
    assert sorted(names) == ["A", "available", "scale", "state"]


@pytest.mark.parametrize(("batch", "seq"), [(3, 7), (1, 1), (4, 30)])  # 4 x 30 > 64 tokens: grouped layout
def test_fused_equals_each_module_alone(
    tiny_base: Path, experts: list[Path], monkeypatch: pytest.MonkeyPatch, batch: int, seq: int
) -> None:
    fused, fused_layers, alone, alone_layers = _models(tiny_base, experts, monkeypatch)
    ids = _ids(batch * 100 + seq, batch, seq)
    with torch.no_grad():
        got = fused(input_ids=ids).logits
        expected = alone(input_ids=ids).logits
    _same_routes(fused_layers, alone_layers)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if batch * seq > 1:  # not vacuous: tokens in the batch take different routes
        route = fused_layers["model.layers.0.self_attn.k_proj"].last_route
        assert route is not None and len({frozenset(r) for r in route.experts.tolist()}) > 1


def test_fused_generation_and_decode_steps_match(
    tiny_base: Path, experts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fused, _, alone, _ = _models(tiny_base, experts, monkeypatch, top_k=3)
    ids = _ids(9, 4, 5)
    with torch.no_grad():
        a = fused.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        b = alone.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_row_bias_with_shared_input(tiny_base: Path, experts: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fused, fused_layers, alone, alone_layers = _models(tiny_base, experts, monkeypatch)
    ids = _ids(11, 2, 4)
    strong = torch.zeros(2, 5)
    strong[0, 4], strong[1, 1] = 1e3, 1e3  # sequence 0 must take expert 4, sequence 1 expert 1
    for layers in (fused_layers, alone_layers):
        for layer in layers.values():
            layer.row_bias = strong
    # One member with a bias of its own (a different tensor): the group stacks the members' biases.
    other = torch.zeros(2, 5)
    other[:, 2] = 1e3
    fused_layers["model.layers.1.self_attn.v_proj"].row_bias = other
    alone_layers["model.layers.1.self_attn.v_proj"].row_bias = other
    with torch.no_grad():
        got = fused(input_ids=ids).logits
        expected = alone(input_ids=ids).logits
    _same_routes(fused_layers, alone_layers)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    q = fused_layers["model.layers.1.self_attn.q_proj"].last_route
    v = fused_layers["model.layers.1.self_attn.v_proj"].last_route
    assert q is not None and v is not None
    assert (q.experts.view(2, 4, 2)[0] == 4).any(dim=-1).all() and (q.experts.view(2, 4, 2)[1] == 1).any(dim=-1).all()
    assert (v.experts == 2).any(dim=-1).all()


def test_member_called_on_another_input(tiny_base: Path, experts: list[Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    layers = apply_mixture(model, [load_lora_adapter(p) for p in experts], _arrow())
    q = layers["model.layers.0.self_attn.q_proj"]
    k = layers["model.layers.0.self_attn.k_proj"]
    group = q.group
    gen = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)

    def alone(layer: MixtureLinear, x: torch.Tensor) -> torch.Tensor:
        route = layer.router.route(x, layer.state, layer.available)
        return layer.base(x) + dense_lora_delta(x, route.experts, route.weights, layer.A, layer.B, layer.scale)

    with torch.no_grad():
        torch.testing.assert_close(q(x1), alone(q, x1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(k(x2), alone(k, x2), atol=1e-6, rtol=1e-5)  # not x1: routed afresh
        torch.testing.assert_close(k(x1), alone(k, x1), atol=1e-6, rtol=1e-5)
        # Members that never share their input: the group stops fusing after MAX_MISSES misses.
        assert group.fused
        for _ in range(MAX_MISSES + 1):
            q(torch.randn(3, 32, generator=gen))
            k(torch.randn(3, 32, generator=gen))
        assert not group.fused
        torch.testing.assert_close(k(x2), alone(k, x2), atol=1e-6, rtol=1e-5)


def _stacks(
    M: int = 3, E: int = 6, r: int = 4, d_in: int = 16, outs: tuple[int, ...] = (12, 8, 8)
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    A = torch.randn(M * E, r, d_in, generator=gen)
    Bts = [torch.randn(E, r, o, generator=gen) for o in outs[:M]]
    scale = torch.rand(M * E, generator=gen) + 0.5
    return A, Bts, scale


def _baddbmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, out_shape: Any = None, **_: Any) -> int:
    batch, n, inner = a_shape
    return 2 * batch * n * inner * int(b_shape[2])


def _grouped_mm_flop(a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
    rows, inner = a_shape  # every row of ``a`` meets exactly one group's [inner, n] matrix
    return 2 * rows * inner * int(b_shape[2])


@pytest.mark.parametrize("tokens", [1, 5, 70])
@pytest.mark.parametrize("grouped", [False, True])
def test_project_down_up_equal_dense_and_compute_only_chosen(tokens: int, grouped: bool) -> None:
    M, E, r, d_in, k = 3, 6, 4, 16, 2
    A, Bts, scale = _stacks()
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d_in, generator=gen)
    # Only experts 0..3 are ever chosen; token 0 picks one expert twice in module 0.
    experts = torch.stack(
        [torch.stack([torch.randperm(4, generator=gen)[:k] for _ in range(M)]) for _ in range(tokens)]
    )
    experts[0, 0] = torch.tensor([2, 2])
    weights = torch.softmax(torch.randn(tokens, M, k, generator=gen), dim=-1)
    # The counter knows baddbmm but not its in-place form, which the gathered layout adds into the output with,
    # nor _grouped_mm, which the grouped layout runs its segments with.
    mapping = {torch.ops.aten.baddbmm_: _baddbmm_flop, torch.ops.aten._grouped_mm: _grouped_mm_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as flops:
        low = project_down(x, A, scale, experts, weights, grouped=grouped)
        outs = [project_up(low, j, Bts[j], torch.zeros(tokens, Bts[j].shape[2])) for j in range(M)]
    for j in range(M):
        rows = slice(j * E, (j + 1) * E)
        dense = dense_lora_delta(x, experts[:, j], weights[:, j], A[rows], Bts[j].transpose(1, 2), scale[rows])
        torch.testing.assert_close(outs[j], dense, atol=1e-5, rtol=1e-5)
    # One A product per (token, module, slot), one B product per (token, slot) in each module: nothing for
    # experts no token chose.
    expected = sum(2 * tokens * k * r * (d_in + Bts[j].shape[2]) for j in range(M))
    assert flops.get_total_flops() == expected


def test_grouped_layout_without_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-group loop that stands in when torch has no _grouped_mm gives the same result."""
    A, Bts, scale = _stacks()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 16, generator=gen)
    experts = torch.randint(0, 6, (9, 3, 2), generator=gen)
    weights = torch.rand(9, 3, 2, generator=gen)
    low = project_down(x, A, scale, experts, weights, grouped=True)
    want = project_up(low, 1, Bts[1], torch.zeros(9, 8))
    monkeypatch.setattr(mixture_mod, "_HAS_GROUPED_MM", False)
    low = project_down(x, A, scale, experts, weights, grouped=True)
    torch.testing.assert_close(project_up(low, 1, Bts[1], torch.zeros(9, 8)), want)


def test_group_follows_to(tiny_base: Path, experts: list[Path]) -> None:
    model, layers = load_mixture_model(tiny_base, experts[:2], _arrow())
    model.to(torch.float64)
    group = layers["model.layers.0.mlp.up_proj"].group
    assert isinstance(group, SharedInputMixture) and group.A.dtype == torch.float64
    assert layers["model.layers.0.mlp.up_proj"].Bt.dtype == torch.float64
    with torch.no_grad():
        assert model(input_ids=_ids(1, 1, 3)).logits.dtype == torch.float64


class _PlainRouter(TokenRouter):
    """A router with only the base interface (no route_shared), like a new router would start."""

    name = "plain_test"
    config_cls = ArrowConfig
    help = "test only"

    def __init__(self) -> None:
        super().__init__(ArrowConfig(top_k=2))
        self.arrow = _arrow(2)

    def fit_adapter(self, adapter: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.arrow.fit_adapter(adapter)

    def route(
        self, x: torch.Tensor, state: torch.Tensor, available: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Route:
        return self.arrow.route(x, state, available, bias)


def test_router_without_route_shared(tiny_base: Path, experts: list[Path]) -> None:
    """Such a router is called per module (no groups), and gives what arrow gives."""
    plain, plain_layers = load_mixture_model(tiny_base, experts, _PlainRouter())
    arrow, _ = load_mixture_model(tiny_base, experts, _arrow(2))
    assert all(layer.group.size == 1 for layer in plain_layers.values())
    bias = torch.zeros(2, 5)
    bias[1, 3] = 1e3
    for model in (plain, arrow):
        for m in model.modules():
            if isinstance(m, MixtureLinear):
                m.row_bias = bias
    ids = _ids(2, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, arrow(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# 6 floats a row is not whole 16-byte blocks, and _grouped_mm refuses float64: the loop runs for those two
@pytest.mark.parametrize(("inner", "dtype"), [(8, torch.float32), (6, torch.float32), (8, torch.float64)])
def test_segment_mm_with_empty_groups(inner: int, dtype: torch.dtype) -> None:
    from serving.mixture.sparse import segment_mm

    gen = torch.Generator().manual_seed(inner)
    counts = [0, 3, 0, 0, 5, 1, 0]  # empty groups first, between and last
    a = torch.randn(sum(counts), inner, generator=gen, dtype=dtype)
    b = torch.randn(len(counts), inner, 4, generator=gen, dtype=dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    want = torch.cat([rows @ b[g] for g, rows in enumerate(a.split(counts)) if counts[g]])
    torch.testing.assert_close(segment_mm(a, b, offs), want)
