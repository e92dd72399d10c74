"""A mixture as one vLLM adapter slot (serving/mixture/slot.py) run by moerge's LoRA op (serving/lora_ops.py)
gives what the torch mixture layer (serving/mixture/layer.py, the reference) gives, token by token, beside plain
adapters and tokens without one in the same batch. vLLM's stacked weights are built here as vLLM lays them out
(slots x max rank, packed q/k/v slices), from the folder moerge writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from routers.token import TOKEN_ROUTERS
from serving import lora_ops
from serving.mixture import apply_mixture, fused, load_lora_adapter
from serving.mixture.adapters import LoraAdapter
from serving.mixture.slot import (
    AVAILABLE_ROW,
    BIAS_ROW,
    CONSTANT_ROWS,
    GATE_SUM_ROW,
    SPEC_FILE,
    SlotRouting,
    gate_slot,
    loaded_slot_routing,
    read_slot_routing,
    slot_columns,
    write_slot,
)
from tests.fixtures.tiny import build_tiny_lora

QKV = ("q_proj", "k_proj", "v_proj")
LAYER = "model.layers.1.self_attn"
MAX_RANK = 32
MIX_ID, PLAIN_ID = 41, 17  # vLLM's LoRA ids of the two loaded adapters


@pytest.fixture(scope="module")
def members(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[LoraAdapter]:
    """Three adapters of different ranks; the third does not adapt k_proj (never chosen there)."""
    root = tmp_path_factory.mktemp("slot-members")
    shapes = [(2, ("q_proj", "k_proj", "v_proj", "o_proj")), (4, QKV), (4, ("q_proj", "v_proj"))]
    return [
        load_lora_adapter(build_tiny_lora(tiny_base, root / f"m{i}", r=r, alpha=2 * r, target_modules=t, seed=70 + i))
        for i, (r, t) in enumerate(shapes)
    ]


@pytest.fixture(scope="module")
def alike(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[LoraAdapter]:
    """Four adapters of one rank on q/k/v (the usual mixture: the op scales each member's block of a view)."""
    root = tmp_path_factory.mktemp("slot-alike")
    return [
        load_lora_adapter(build_tiny_lora(tiny_base, root / f"a{i}", r=4, alpha=8, target_modules=QKV, seed=90 + i))
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def plain(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraAdapter:
    return load_lora_adapter(
        build_tiny_lora(tiny_base, tmp_path_factory.mktemp("plain") / "p", r=8, target_modules=QKV)
    )


@pytest.fixture(autouse=True)
def fresh_op_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_ops._Caches, "enabled", False)
    monkeypatch.setattr(lora_ops._Caches, "slot_layout", None)
    for name in ("one_hot", "per_token", "expand_weights", "zero", "routing", "packed"):
        monkeypatch.setattr(lora_ops._Caches, name, {})
    monkeypatch.setattr(lora_ops, "MIXTURE_SLOTS", {})
    monkeypatch.setattr(lora_ops, "LAYER_PLANS", {})
    monkeypatch.setattr(lora_ops._Requests, "rows", None)


@pytest.fixture(params=["compiled", "torch"])
def gating(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The op's gating of a routed slot both ways: the compiled loop (numba) and the torch ops."""
    monkeypatch.setattr(fused, "ENABLED", request.param == "compiled")
    assert fused.available() == (request.param == "compiled")  # numba is installed with vLLM: the loop runs
    return str(request.param)


def _states(kind: str, adapters: list[LoraAdapter], seed: int = 3) -> list[dict[str, torch.Tensor]]:
    if kind == "arrow":
        return [TOKEN_ROUTERS.build("arrow", {}).fit_adapter(a) for a in adapters]
    gen = torch.Generator().manual_seed(seed)
    extra = 1 if kind == "mixer" else 0
    return [{m: torch.randn(w.A.shape[1] + extra, generator=gen) for m, w in a.modules.items()} for a in adapters]


ROUTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "arrow": ("arrow", {"top_k": 2, "temperature": 0.7}),
    "phatgoose": ("phatgoose", {"top_k": 2}),
    "mixer": ("mixer", {"top_k": 2, "examples": [{"prompt": "p", "answer": "a"}]}),
}


def _reference(
    tiny_base: Path, adapters: list[LoraAdapter], kind: str, states: Any, x: torch.Tensor, bias: Any = None
) -> dict[str, torch.Tensor]:
    """The torch mixture layer's LoRA term (output minus the base layer's) per q/k/v module for ``x``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    name, params = ROUTERS[kind]
    wrapped = apply_mixture(model, adapters, TOKEN_ROUTERS.build(name, params), states)
    out = {}
    with torch.no_grad():
        for leaf in QKV:
            layer = wrapped[f"{LAYER}.{leaf}"]
            layer.row_bias = bias
            out[leaf] = layer(x) - layer.base(x)
    return out


def _stacked(slots: list[dict[str, torch.Tensor] | None], leaf: str, side: str, shape: tuple[int, int]) -> torch.Tensor:
    """vLLM's [slots, 1, rank, in] (A) or [slots, 1, out, rank] (B) for one slice, each adapter zero-padded."""
    rows, cols = shape
    full = torch.zeros(len(slots), 1, MAX_RANK if side == "A" else rows, cols if side == "A" else MAX_RANK)
    for slot, tensors in enumerate(slots):
        key = f"base_model.model.{LAYER}.{leaf}.lora_{side}.weight"
        if tensors is None or key not in tensors:
            continue
        t = tensors[key]
        full[slot, 0, : t.shape[0], : t.shape[1]] = t
    return full


def _plain_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """A plain adapter as vLLM holds it: its scaling folded into B."""
    out = {}
    for module, w in adapter.modules.items():
        out[f"base_model.model.{module}.lora_A.weight"] = w.A
        out[f"base_model.model.{module}.lora_B.weight"] = w.B * w.scale
    return out


def _run_op(
    folder: Path, plain: LoraAdapter, x: torch.Tensor, indices: torch.Tensor, requests: torch.Tensor | None = None
) -> torch.Tensor:
    mix = load_file(str(folder / "adapter_model.safetensors"))
    slots = [_plain_tensors(plain), mix]
    shapes = {leaf: tuple(plain.modules[f"{LAYER}.{leaf}"].B.shape) for leaf in QKV}
    a = tuple(_stacked(slots, leaf, "A", (MAX_RANK, x.shape[1])) for leaf in QKV)
    b = tuple(_stacked(slots, leaf, "B", (shapes[leaf][0], MAX_RANK)) for leaf in QKV)
    widths = [shapes[leaf][0] for leaf in QKV]
    lora_ops.register_mixture(MIX_ID, read_slot_routing(folder))
    lora_ops.register_mixture(PLAIN_ID, read_slot_routing(folder.parent))  # a folder without the spec: plain
    lora_ops.mapping_updated([PLAIN_ID, MIX_ID])
    lora_ops.set_request_rows(requests)
    y = torch.zeros(x.shape[0], sum(widths))
    lora_ops.add_lora_linear(y, x, a, b, 1.0, widths, indices)
    return y


def _slot(tmp_path: Path, members: list[LoraAdapter], kind: str, **routing: Any) -> tuple[Path, Any]:
    states = _states(kind, members) if kind != "weighted" else []
    ranks = tuple(max(w.rank for w in a.modules.values()) for a in members)
    params = ROUTERS[kind][1] if kind in ROUTERS else {}
    spec = SlotRouting(kind=kind, ranks=ranks, top_k=params.get("top_k", 1), **routing)
    if kind == "arrow":
        spec = SlotRouting(kind=kind, ranks=ranks, top_k=2, temperature=0.7, **routing)
    return write_slot(tmp_path / f"slot-{kind}", members, states, spec), states


def _split(y: torch.Tensor, plain: LoraAdapter) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for leaf in QKV:
        width = plain.modules[f"{LAYER}.{leaf}"].B.shape[0]
        out[leaf] = y[:, start : start + width]
        start += width
    return out


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "grouped"])
@pytest.mark.parametrize("kind", ["arrow", "phatgoose", "mixer"])
@pytest.mark.usefixtures("gating")
def test_mixture_slot_equals_the_torch_mixture_layer_in_a_mixed_batch(
    kind: str,
    dense: bool,
    tiny_base: Path,
    members: list[LoraAdapter],
    plain: LoraAdapter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not dense:
        monkeypatch.setattr(lora_ops, "DENSE_SLOT_COLUMNS", 0)
    # tokens 0-5: the mixture; 6-8: the plain adapter; 9-10: no adapter
    _check_mixed_batch(tiny_base, tmp_path, members, plain, kind, (6, 3, 2), seed=5)


def _check_mixed_batch(
    tiny_base: Path,
    tmp_path: Path,
    members: list[LoraAdapter],
    plain: LoraAdapter,
    kind: str,
    counts: tuple[int, int, int],
    seed: int,
) -> None:
    """A batch of ``counts`` tokens (the mixture's, the plain adapter's, no adapter's) through the op: the mixture's
    rows equal the torch mixture layer's, the adapter's its own path, the rest nothing."""
    folder, states = _slot(tmp_path, members, kind)
    mix, adapter, none = counts
    x = torch.randn(mix + adapter + none, 32, generator=torch.Generator().manual_seed(seed))
    indices = torch.tensor([1] * mix + [0] * adapter + [-1] * none)
    y = _split(_run_op(folder, plain, x, indices), plain)
    expected = _reference(tiny_base, members, kind, states, x[:mix])
    own = slice(mix, mix + adapter)
    for leaf in QKV:
        torch.testing.assert_close(y[leaf][:mix], expected[leaf], rtol=1e-4, atol=1e-5)
        module = plain.modules[f"{LAYER}.{leaf}"]
        torch.testing.assert_close(
            y[leaf][own], (x[own] @ module.A.T) @ module.B.T * module.scale, rtol=1e-4, atol=1e-5
        )
        assert torch.count_nonzero(y[leaf][mix + adapter :]) == 0


@pytest.mark.parametrize("b_side", ["block", "slices"])
@pytest.mark.parametrize("kind", ["arrow", "phatgoose", "mixer"])
@pytest.mark.usefixtures("gating")
def test_members_of_one_rank_and_each_b_product_layout_equal_the_torch_layer(
    kind: str,
    b_side: str,
    tiny_base: Path,
    alike: list[LoraAdapter],
    plain: LoraAdapter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Members of one rank are gated through a view of their columns; B is applied per output slice, or as one
    block matrix for few tokens: every way gives the torch mixture layer's answer, and the plain adapter's beside."""
    monkeypatch.setattr(lora_ops, "BLOCK_PRODUCT_WORK", 10**9 if b_side == "block" else 0)
    monkeypatch.setattr(lora_ops, "BLOCK_PRODUCT_ELEMENTS", 10**9)
    _check_mixed_batch(tiny_base, tmp_path, alike, plain, kind, (7, 4, 1), seed=6)


@pytest.mark.usefixtures("gating")
def test_the_routing_is_per_token_not_a_blend(members: list[LoraAdapter], plain: LoraAdapter, tmp_path: Path) -> None:
    """Top-1 Arrow gives each token exactly one member's path (an all-members sum would differ)."""
    ranks = tuple(max(w.rank for w in a.modules.values()) for a in members)
    states = _states("arrow", members)
    folder = write_slot(tmp_path / "top1", members, states, SlotRouting("arrow", ranks, top_k=1))
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(8))
    y = _split(_run_op(folder, plain, x, torch.ones(6, dtype=torch.long)), plain)["q_proj"]
    module = f"{LAYER}.q_proj"
    paths = torch.stack(
        [(x @ a.modules[module].A.T) @ a.modules[module].B.T * a.modules[module].scale for a in members]
    )
    chosen = torch.stack([(x @ s[module]).abs() for s in states]).argmax(dim=0)
    torch.testing.assert_close(y, paths[chosen, torch.arange(6)], rtol=1e-4, atol=1e-5)
    assert len(set(chosen.tolist())) > 1  # the test means something: tokens chose differently


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "grouped"])
@pytest.mark.usefixtures("gating")
def test_a_requests_bias_reaches_the_router_glider(
    dense: bool,
    tiny_base: Path,
    members: list[LoraAdapter],
    plain: LoraAdapter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GLIDER: each request's bias (one per member) joins the scores of its own tokens only."""
    if not dense:
        monkeypatch.setattr(lora_ops, "DENSE_SLOT_COLUMNS", 0)
    folder, states = _slot(tmp_path, members, "phatgoose", request="bias")
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(9))
    first, second = torch.tensor([4.0, -4.0, 0.0]), torch.tensor([-4.0, 0.0, 4.0])
    requests = torch.stack([first] * 4 + [second] * 3 + [torch.full((3,), float("nan"))])  # padding: no request
    y = _split(_run_op(folder, plain, x, torch.tensor([1] * 7 + [-1]), requests), plain)
    for rows, bias in ((slice(0, 4), first), (slice(4, 7), second)):
        expected = _reference(tiny_base, members, "phatgoose", states, x[rows], bias.unsqueeze(0))
        for leaf in QKV:
            torch.testing.assert_close(y[leaf][rows], expected[leaf], rtol=1e-4, atol=1e-5)
    unbiased = _reference(tiny_base, members, "phatgoose", states, x[:4])
    assert not torch.allclose(y["q_proj"][:4], unbiased["q_proj"], atol=1e-4)  # the bias changed the routing


def test_weighted_slot_applies_each_requests_weights(
    members: list[LoraAdapter], plain: LoraAdapter, tmp_path: Path
) -> None:
    """A weighted slot: Σ w_e · scale_e B_e A_e x with the request's weights, or the slot's defaults."""
    ranks = tuple(max(w.rank for w in a.modules.values()) for a in members)
    folder = write_slot(
        tmp_path / "weighted", members, [], SlotRouting("weighted", ranks, request="weights", weights=(0.2, 0.3, 0.5))
    )
    assert json.loads((folder / SPEC_FILE).read_text())["kind"] == "weighted"
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    given = torch.tensor([0.7, 0.0, 0.3])
    requests = torch.stack([given] * 3 + [torch.full((3,), float("nan"))] * 3)
    y = _split(_run_op(folder, plain, x, torch.ones(6, dtype=torch.long), requests), plain)
    for leaf in QKV:
        module = f"{LAYER}.{leaf}"
        paths = [
            (x @ a.modules[module].A.T) @ a.modules[module].B.T * a.modules[module].scale
            if module in a.modules
            else torch.zeros(6, y[leaf].shape[1])
            for a in members
        ]
        for rows, w in ((slice(0, 3), given), (slice(3, 6), torch.tensor([0.2, 0.3, 0.5]))):
            expected = sum(float(w[e]) * paths[e][rows] for e in range(3))
            torch.testing.assert_close(y[leaf][rows], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("gating")
def test_one_member_slot_equals_the_plain_adapter(plain: LoraAdapter, tmp_path: Path) -> None:
    folder = write_slot(tmp_path / "one", [plain], _states("arrow", [plain]), SlotRouting("arrow", (8,), top_k=2))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    y = _split(_run_op(folder, plain, x, torch.tensor([1, 1, 0, 0, 1])), plain)
    for leaf in QKV:
        module = plain.modules[f"{LAYER}.{leaf}"]
        torch.testing.assert_close(y[leaf], (x @ module.A.T) @ module.B.T * module.scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["arrow", "phatgoose", "mixer"])
@pytest.mark.parametrize("biased", [False, True], ids=["", "biased"])
def test_compiled_gating_equals_the_torch_ops(kind: str, biased: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled gating scales a slot's columns as the torch ops do, for members of unlike ranks, slices where
    some members are unavailable (so each slice keeps its own k, one none at all) and a request's bias."""
    gen = torch.Generator().manual_seed(11)
    ranks, tokens, inputs = (2, 3, 1, 2), 9, 16
    routing = SlotRouting(kind, ranks, top_k=2, temperature=0.6, request="bias" if biased else None)
    availability = [(1, 1, 1, 1), (0, 1, 0, 1), (0, 0, 1, 0), (0, 0, 0, 0)]  # keeps 2, 2, 1 and 0 members
    b_blocks = []
    for row in availability:
        b = torch.zeros(CONSTANT_ROWS, routing.rank)
        b[BIAS_ROW, routing.lora_columns :] = torch.randn(4, generator=gen)
        b[AVAILABLE_ROW, routing.lora_columns :] = torch.tensor(row, dtype=torch.float32)
        b[GATE_SUM_ROW, routing.lora_columns :] = torch.randn(4, generator=gen)
        b_blocks.append(b)
    columns = slot_columns(routing, 3, b_blocks)  # the slot's block starts at column 3 of the product
    assert columns.ks == (2, 2, 1, 0)
    shrunk = torch.randn(tokens, 3 + columns.slices * routing.rank + 2, generator=gen)
    x = torch.randn(tokens, inputs, generator=gen)
    request = torch.randn(tokens, 4, generator=gen) * 3 if biased else None
    if kind == "mixer":  # a trained mixer's logits: gates that all round to 1.0, still ranked alike both ways
        shrunk[:, columns.lora_stop :] = 20 + 20 * torch.rand(
            tokens, shrunk.shape[1] - columns.lora_stop, generator=gen
        )
    answers = []
    for compiled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", compiled)
        out = shrunk.clone()
        gate_slot(columns, out, x, request)
        answers.append(out)
    torch.testing.assert_close(answers[0], answers[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(answers[0][:, columns.lora_stop :], shrunk[:, columns.lora_stop :])  # router columns stay
    gated = answers[0][:, columns.start : columns.lora_stop].view(tokens, columns.slices, -1)
    assert torch.count_nonzero(gated[:, 3]) == 0  # no member available there: nothing passes


def test_compiled_gating_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mock, named so (numba finding no writable cache folder cannot be caused as root): the loop still compiles,
    uncached, and gates: top-1 of two members keeps the one with the larger |score|, at weight 1."""
    import numba

    real = numba.njit

    def no_cache(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function '_top_k_gate': no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache)
    fused._compiled.cache_clear()
    try:
        assert fused.available()
        product = torch.tensor([[5.0, 5.0, 1.0, -3.0]])  # two LoRA columns (one per member), then two scores
        plan = fused.gate_plan(torch.ones(1, 2, dtype=torch.bool), torch.tensor([0, 1]), (1,))
        fused.top_k_gate_(product, 0, product, 2, plan, fused.ABS_SOFTMAX)
        assert product.tolist() == [[0.0, 5.0, 1.0, -3.0]]
    finally:
        fused._compiled.cache_clear()  # the next test compiles (or loads) the cached loop again


def test_slot_routing_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        SlotRouting("dense", (4,))
    with pytest.raises(ValueError, match="members"):
        SlotRouting("arrow", ())
    with pytest.raises(ValueError, match="weighted"):
        SlotRouting("arrow", (4,), request="weights")
    with pytest.raises(ValueError, match="finite"):
        SlotRouting("weighted", (4, 4), request="weights", weights=(1.0, float("nan")))
    assert read_slot_routing(tmp_path) is None
    spec = SlotRouting("mixer", (2, 4), top_k=1)
    assert SlotRouting.from_json(spec.as_json()) == spec and spec.rank == 8


def test_a_spec_that_does_not_fit_the_loaded_weights_is_a_plain_adapter(
    members: list[LoraAdapter], tmp_path: Path
) -> None:
    """An expert's upload may carry a moerge_mixture.json: vLLM's worker honours it only when it parses and its rank
    is the rank of the weights loaded; otherwise the adapter is served as a plain one (no crash, no odd routing)."""
    ranks = tuple(max(w.rank for w in a.modules.values()) for a in members)
    spec = SlotRouting("arrow", ranks, top_k=2)
    folder = write_slot(tmp_path / "slot", members, _states("arrow", members), spec)
    assert loaded_slot_routing(folder, spec.rank) == spec
    assert loaded_slot_routing(folder, spec.rank + 8) is None
    (folder / SPEC_FILE).write_text('{"format": 1, "kind": "arrow", "ranks": [0]}')
    assert loaded_slot_routing(folder, spec.rank) is None
    (folder / SPEC_FILE).write_text("not json")
    assert loaded_slot_routing(folder, spec.rank) is None
    assert loaded_slot_routing(tmp_path, 8) is None
