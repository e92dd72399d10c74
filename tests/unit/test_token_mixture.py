"""Token-level LoRA mixture and the ``arrow`` router against PEFT on tiny seeded models: one adapter at
top-1 is PEFT's single adapter, sparse dispatch equals the dense reference without computing unchosen
experts, and ``arrow`` picks the experts PEFT's own Arrow picks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import ArrowConfig as PeftArrowConfig
from peft import LoraConfig, PeftModel, create_arrow_model, get_peft_model
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from core.errors import ValidationFailed
from routers.token import TOKEN_ROUTERS, AdapterRefused, MixtureLinear, load_lora_adapter, load_mixture_model
from routers.token.arrow import ArrowConfig, ArrowRouter, top_right_singular_vector
from serving.mixture import sparse as mixture_mod
from serving.mixture.adapters import stack_module
from serving.mixture.sparse import dense_lora_delta, sparse_lora_delta
from tests.fixtures.tiny import build_tiny_lora

TARGETS = ("q_proj", "v_proj", "down_proj")
PEFT_MODULE_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def experts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four same-shape adapters (PEFT's Arrow needs equal ranks and targets)."""
    root = tmp_path_factory.mktemp("token-experts")
    return [
        build_tiny_lora(tiny_base, root / f"expert{i}", r=4, alpha=8, target_modules=TARGETS, seed=10 + i)
        for i in range(4)
    ]


def _with_spectral_gap(adapter: Path) -> Path:
    """Rewrite every module as B'·A' with the same top singular pair and the others shrunk to at most
    0.4·σ1. PEFT's Arrow runs a fixed 15 power iterations from a random start, which on random tiny
    adapters (σ2/σ1 up to ~0.94) stops short of the singular vector; with this gap both converge."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        b_key = key.replace("lora_A", "lora_B")
        U, S, Vh = torch.linalg.svd(tensors[b_key] @ tensors[key], full_matrices=False)
        r = tensors[key].shape[0]
        s = S[0] * torch.tensor([1.0, 0.4, 0.3, 0.2][:r])
        tensors[key] = (s[:, None] * Vh[:r]).contiguous()
        tensors[b_key] = U[:, :r].contiguous()
    save_file(tensors, str(path))
    return adapter


@pytest.fixture(scope="module")
def gapped_experts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("gapped-experts")
    return [
        _with_spectral_gap(
            build_tiny_lora(tiny_base, root / f"gapped{i}", r=4, alpha=8, target_modules=TARGETS, seed=20 + i)
        )
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def scaled_lora(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rsLoRA plus an alpha_pattern, set in the config after saving: PEFT reads them back on load."""
    dest = build_tiny_lora(
        tiny_base, tmp_path_factory.mktemp("scaled") / "scaled", r=4, alpha=8, target_modules=TARGETS, seed=3
    )
    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = True
    cfg["alpha_pattern"] = {"v_proj": 32}
    cfg_path.write_text(json.dumps(cfg))
    return dest


def _ids(seed: int, batch: int = 2, seq: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 256, (batch, seq), generator=gen)


def _base(tiny_base: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


def _arrow(top_k: int, temperature: float = 1.0) -> ArrowRouter:
    router = TOKEN_ROUTERS.build("arrow", {"top_k": top_k, "temperature": temperature})
    assert isinstance(router, ArrowRouter)
    return router


# -- config ------------------------------------------------------------------------------------------


def test_arrow_config_defaults_and_validation() -> None:
    # PEFT's ArrowConfig defaults: top_k=3, router_temperature=1.0.
    peft_default = PeftArrowConfig()
    assert ArrowConfig() == ArrowConfig(top_k=peft_default.top_k, temperature=peft_default.router_temperature)
    for params, field in (({"top_k": 0}, "top_k"), ({"temperature": 0.0}, "temperature"), ({"k": 2}, "k")):
        with pytest.raises(ValidationFailed) as err:
            TOKEN_ROUTERS.config("arrow", params)
        assert err.value.param == f"router_params.{field}"
    with pytest.raises(ValidationFailed):
        TOKEN_ROUTERS.get("nope")


# -- PEFT equivalence with one adapter ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "rslora_alpha_pattern"])
def test_one_adapter_top1_equals_peft(which: str, tiny_base: Path, experts: list[Path], scaled_lora: Path) -> None:
    adapter = experts[0] if which == "plain" else scaled_lora
    ids = _ids(0)
    peft = PeftModel.from_pretrained(_base(tiny_base), str(adapter)).eval()
    model, layers = load_mixture_model(tiny_base, [adapter], _arrow(top_k=1))
    assert set(layers) == {
        f"model.layers.{i}.{part}.{leaf}"
        for i in range(2)
        for part, leaf in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))
    }
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        got = model(input_ids=ids).logits
        plain = _base(tiny_base)(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter does change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- sparse dispatch ----------------------------------------------------------------------------------


def _random_stack(
    E: int = 6, ranks: tuple[int, ...] = (2, 4, 3, 4, 1, 4), d_in: int = 16, d_out: int = 12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(1)
    r_max = max(ranks)
    A = torch.zeros(E, r_max, d_in)
    B = torch.zeros(E, d_out, r_max)
    for e, r in enumerate(ranks):
        A[e, :r] = torch.randn(r, d_in, generator=gen)
        B[e, :, :r] = torch.randn(d_out, r, generator=gen)
    scale = torch.rand(E, generator=gen) + 0.5
    return A, B, scale, list(ranks)


@pytest.mark.parametrize("tokens", [20, 1])  # 1: the decode (batch 1) path
def test_sparse_dispatch_equals_dense_reference(tokens: int) -> None:
    A, B, scale, ranks = _random_stack()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 16, generator=gen)
    experts = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(tokens)])  # never experts 4, 5
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1)
    dense = dense_lora_delta(x, experts, weights, A, B, scale)
    torch.testing.assert_close(sparse_lora_delta(x, A, B, scale, experts, weights, ranks), dense)
    torch.testing.assert_close(sparse_lora_delta(x, A, B, scale, experts, weights), dense)  # padded path
    # And by hand for one token.
    t = tokens - 1
    by_hand = sum(weights[t, j] * scale[e] * (B[e] @ (A[e] @ x[t])) for j, e in enumerate(experts[t].tolist()))
    torch.testing.assert_close(dense[t], by_hand)


def test_sparse_dispatch_computes_only_chosen_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    A, B, scale, ranks = _random_stack()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=gen)
    # Tokens only ever choose experts 1 and 3.
    experts = torch.tensor([[1, 3] if t % 2 else [3, 1] for t in range(10)])
    experts[0] = torch.tensor([1, 1])  # a repeated choice is still one path per (token, slot)
    weights = torch.full((10, 2), 0.5)

    calls: list[tuple[int, int]] = []  # (rows, rank) of each expert path actually run
    real = mixture_mod.lora_path

    def counting(xe: torch.Tensor, Ae: torch.Tensor, Be: torch.Tensor) -> torch.Tensor:
        calls.append((xe.reshape(-1, xe.shape[-1]).shape[0], Ae.shape[0]))
        return real(xe, Ae, Be)

    monkeypatch.setattr(mixture_mod, "lora_path", counting)
    with FlopCounterMode(display=False) as flops:
        sparse_lora_delta(x, A, B, scale, experts, weights, ranks)
    # One path per chosen expert, over exactly that expert's (token, slot) pairs, at its true rank.
    assert sorted(calls) == sorted([(11, ranks[1]), (9, ranks[3])])
    pairs = {1: 11, 3: 9}
    expected = sum(2 * n * ranks[e] * (16 + 12) for e, n in pairs.items())
    assert flops.get_total_flops() == expected
    with FlopCounterMode(display=False) as dense_flops:
        dense_lora_delta(x, experts, weights, A, B, scale)
    assert dense_flops.get_total_flops() > 2 * expected

    # One token (decode, batch 1): one path per chosen expert, nothing else.
    calls.clear()
    with FlopCounterMode(display=False) as flops:
        sparse_lora_delta(x[:1], A, B, scale, torch.tensor([[4, 0]]), weights[:1], ranks)
    assert sorted(calls) == sorted([(1, ranks[4]), (1, ranks[0])])
    assert flops.get_total_flops() == sum(2 * ranks[e] * (16 + 12) for e in (4, 0))


# -- ranks, target modules, refusals ------------------------------------------------------------------


def test_different_ranks_and_targets_are_exact(tiny_base: Path, tmp_path: Path) -> None:
    small = build_tiny_lora(tiny_base, tmp_path / "small", r=2, alpha=4, target_modules=("q_proj",), seed=5)
    big = build_tiny_lora(tiny_base, tmp_path / "big", r=6, alpha=3, target_modules=("q_proj", "up_proj"), seed=6)
    adapters = [load_lora_adapter(small), load_lora_adapter(big)]
    q = "model.layers.0.self_attn.q_proj"
    stack = stack_module(adapters, q, 32, 32, torch.float32)
    assert stack.ranks == [2, 6] and stack.A.shape == (2, 6, 32) and stack.B.shape == (2, 32, 6)
    for e, adapter in enumerate(adapters):  # zero padding leaves every B·A unchanged
        w = adapter.modules[q]
        torch.testing.assert_close(stack.B[e] @ stack.A[e], w.B @ w.A, atol=0, rtol=0)

    model, layers = load_mixture_model(tiny_base, [small, big], _arrow(top_k=2))
    up = layers["model.layers.1.mlp.up_proj"]
    assert up.available.tolist() == [False, True]  # `small` has no up_proj: never routed to there
    refs: dict[str, torch.Tensor] = {}

    def reference(layer: MixtureLinear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # Recompute the layer from the unpadded adapter weights and the route the layer took.
        assert layer.last_route is not None
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        expected = layer.base(x)
        for t in range(x.shape[0]):
            for e, c in zip(layer.last_route.experts[t].tolist(), layer.last_route.weights[t], strict=True):
                w = adapters[e].modules[layer.name]
                expected[t] += c * w.scale * (w.B @ (w.A @ x[t]))
        refs[layer.name] = (output.reshape(expected.shape) - expected).abs().max()

    for layer in layers.values():
        layer.record = True
        layer.register_forward_hook(reference)
    with torch.no_grad():
        model(input_ids=_ids(1))
    assert set(refs) == set(layers)
    assert max(float(v) for v in refs.values()) < 1e-5
    assert up.last_route is not None and up.last_route.experts.unique().tolist() == [1]
    q_route = layers[q].last_route
    assert q_route is not None and q_route.experts.shape[1] == 2


@pytest.mark.filterwarnings("ignore:.*(embedding|tied layer).*:UserWarning")
def test_dora_and_embedding_adapters_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    dora_dir = tmp_path / "my-dora"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    get_peft_model(_base(tiny_base), cfg).save_pretrained(str(dora_dir))
    with pytest.raises(AdapterRefused, match=r"'my-dora'.*DoRA"):
        load_lora_adapter(dora_dir)
    emb = build_tiny_lora(tiny_base, tmp_path / "my-emb", target_modules=("embed_tokens",))
    with pytest.raises(AdapterRefused, match=r"'my-emb'.*embedding"):
        load_lora_adapter(emb)
    # Named explicitly, the error carries that name.
    with pytest.raises(AdapterRefused, match="'expert-x'"):
        load_mixture_model(tiny_base, [dora_dir], _arrow(1), names=["expert-x"])


# -- batching -----------------------------------------------------------------------------------------


def test_batch_with_different_routes_matches_each_sequence_alone(tiny_base: Path, experts: list[Path]) -> None:
    model, layers = load_mixture_model(tiny_base, experts, _arrow(top_k=2))
    for layer in layers.values():
        layer.record = True
    ids = _ids(4, batch=3, seq=6)
    with torch.no_grad():
        batched = model(input_ids=ids).logits
        routes = {name: layer.last_route for name, layer in layers.items()}
        for b in range(ids.shape[0]):
            alone = model(input_ids=ids[b : b + 1]).logits
            torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-5)
    # The batch really mixes routes: in one forward pass, tokens (of different sequences) take different
    # expert sets at every wrapped module, and the sequences do not share one set between them.
    for name, route in routes.items():
        assert route is not None
        per_seq = [{frozenset(row) for row in seq} for seq in route.experts.reshape(3, 6, 2).tolist()]
        assert len(set().union(*per_seq)) > 1, name
        assert per_seq[0] != per_seq[1] or per_seq[1] != per_seq[2], name


# -- arrow against PEFT's Arrow ----------------------------------------------------------------------


def test_prototype_is_top_right_singular_vector() -> None:
    gen = torch.Generator().manual_seed(7)
    A, B = torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen)
    v = top_right_singular_vector(A, B)
    top = torch.linalg.svd(B @ A).Vh[0]
    assert abs(float(v @ top)) == pytest.approx(1.0, abs=1e-6)
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)


class _SoftmaxTap(TorchFunctionMode):
    """Records the outputs of torch.softmax while ``active`` names a module: PEFT's Arrow coefficients."""

    def __init__(self) -> None:
        super().__init__()
        self.active: str | None = None
        self.coeffs: dict[str, torch.Tensor] = {}

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.active is not None and func is torch.softmax:
            assert self.active not in self.coeffs  # exactly one routing softmax per module call
            self.coeffs[self.active] = out.detach().clone()
        return out


@contextmanager
def _peft_arrow_coefficients(model: torch.nn.Module) -> Iterator[_SoftmaxTap]:
    tap = _SoftmaxTap()
    handles = []
    for name, module in model.named_modules():
        arrow = getattr(module, "lora_arrow", None)
        if arrow is None:
            continue
        layer = arrow["arrow_router"]
        short = name.removeprefix(PEFT_MODULE_PREFIX)

        def pre(_m: torch.nn.Module, _a: Any, short: str = short) -> None:
            tap.active = short

        def post(_m: torch.nn.Module, _a: Any, _o: Any) -> None:
            tap.active = None

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        with tap:
            yield tap
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(("top_k", "temperature"), [(2, 1.0), (1, 1.0), (3, 0.5)])
def test_arrow_matches_peft_arrow(tiny_base: Path, gapped_experts: list[Path], top_k: int, temperature: float) -> None:
    experts = gapped_experts
    ids = _ids(5, batch=2, seq=8)
    peft_cfg = PeftArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    peft = create_arrow_model(_base(tiny_base), [str(p) for p in experts], peft_cfg).eval()
    with torch.no_grad(), _peft_arrow_coefficients(peft) as tap:
        peft_logits = peft(input_ids=ids).logits

    model, layers = load_mixture_model(tiny_base, experts, _arrow(top_k, temperature))
    for layer in layers.values():
        layer.record = True
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    assert set(tap.coeffs) == set(layers)
    distinct_sets = 0
    for name, layer in layers.items():
        route = layer.last_route
        assert route is not None
        theirs = tap.coeffs[name]  # [tokens, E], zero outside the chosen experts
        ours = torch.zeros_like(theirs).scatter_(1, route.experts, route.weights)
        assert ((ours > 0) == (theirs > 0)).all(), f"{name}: chosen experts differ"
        assert int((theirs > 0).sum(dim=1).min()) == top_k
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        distinct_sets = max(distinct_sets, len({frozenset(row) for row in route.experts.tolist()}))
    if top_k < len(experts):  # not vacuous: tokens do pick different experts
        assert distinct_sets > 1
    torch.testing.assert_close(logits, peft_logits, atol=1e-5, rtol=1e-5)
