"""Merge methods: sparsifiers, sign election, the generalized task arithmetic, linear, the registry."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from core.errors import ValidationFailed
from merging.methods import METHODS, InputParams, MergeMethod, MethodConfig, MethodRegistry, merge_tensor
from merging.methods.linear import LinearConfig, linear
from merging.methods.sparsify import dare, magnitude, magnitude_outliers, top_k_mask

TASK_VECTOR_METHODS = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def distinct(n: int, seed: int = 0) -> torch.Tensor:
    """|values| = 1..n in random order with random signs: no ties, ranks known."""
    g = gen(seed)
    magnitudes = torch.randperm(n, generator=g).float() + 1
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return magnitudes * signs


def merge(
    name: str,
    tensors: list[torch.Tensor],
    inputs: list[dict[str, Any]],
    params: dict[str, Any] | None = None,
    seed: int | None = 0,
) -> torch.Tensor:
    method = METHODS.get(name)
    config, parsed = METHODS.configure(name, params or {}, inputs)
    generator = gen(seed) if seed is not None else None
    return merge_tensor(method, tensors, parsed, config, generator)


# --- threshold selection ---


def test_top_k_mask_exact_count_and_nested_under_heavy_ties() -> None:
    scores = torch.randint(0, 4, (97,), generator=gen(3)).float()  # ~24 copies of each value
    previous = torch.zeros(97, dtype=torch.bool)
    for k in range(98):
        mask = top_k_mask(scores, k)
        assert int(mask.sum()) == k
        if 0 < k < 97:
            assert scores[mask].min() >= scores[~mask].max()
        assert not (previous & ~mask).any(), "masks for k <= k' must be nested"
        previous = mask


# --- magnitude (TIES trim) ---


@pytest.mark.parametrize("density", [0.05, 0.1, 0.25, 0.29, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_keeps_exactly_density_fraction_of_largest(density: float, ties: bool) -> None:
    delta = torch.randint(-3, 4, (10, 20), generator=gen(1)).float() if ties else randn(10, 20)
    out = magnitude(delta, density)
    kept = out != 0
    expected = int(density * delta.numel())  # mergekit's rule, float product as written (0.29·200 → 57)
    if ties:
        kept = top_k_mask(delta.abs(), expected)  # zeros in delta would hide kept entries from out != 0
        assert torch.equal(out, delta * kept)
    assert int(kept.sum()) == expected
    assert delta.abs()[kept].min() >= delta.abs()[~kept].max()
    assert torch.equal(out[kept], delta[kept])  # kept values untouched without rescale


def test_magnitude_tiny_density_keeps_one_and_density_one_is_identity() -> None:
    delta = distinct(30)
    out = magnitude(delta, 0.01)  # int(0.3) = 0: mergekit 0.1.5 keeps at least one
    assert int((out != 0).sum()) == 1
    assert out.abs().max() == 30
    assert magnitude(delta, 1.0) is delta


# --- breadcrumbs (magnitude_outliers) ---


def test_breadcrumbs_drops_largest_gamma_and_smallest() -> None:
    delta = distinct(100)
    out = magnitude_outliers(delta, density=0.3, gamma=0.1)
    kept = delta.abs()[out != 0]
    assert sorted(kept.tolist()) == [float(v) for v in range(61, 91)]  # the 10 largest and 60 smallest dropped


def test_breadcrumbs_gamma_below_one_entry_keeps_top_density() -> None:
    # gamma·n = 0.5 < 1: no outlier to drop; the delta must not vanish (mergekit < 0.1.5 returned zeros)
    delta = distinct(50)
    out = magnitude_outliers(delta, density=0.2, gamma=0.01)
    assert sorted(delta.abs()[out != 0].tolist()) == [float(v) for v in range(41, 51)]


def test_breadcrumbs_gamma_zero_is_top_density() -> None:
    delta = randn(8, 16)
    out = magnitude_outliers(delta, density=0.25, gamma=0.0)
    assert int((out != 0).sum()) == 32
    assert torch.equal(out, magnitude(delta, 0.25))


def test_breadcrumbs_drops_fewer_outliers_to_keep_density() -> None:
    delta = distinct(100)
    out = magnitude_outliers(delta, density=0.8, gamma=0.3)  # 80 + 30 > 100: only 20 outliers go
    assert sorted(delta.abs()[out != 0].tolist()) == [float(v) for v in range(1, 81)]


def test_breadcrumbs_tiny_density_still_keeps_an_entry() -> None:
    out = magnitude_outliers(distinct(10), density=0.05, gamma=0.1)  # int(0.5) = 0 in mergekit: empty
    assert int((out != 0).sum()) == 1


def test_breadcrumbs_method_is_weighted_sum_of_masked_deltas() -> None:
    d1, d2 = distinct(40, seed=1), distinct(40, seed=2)
    inputs = [{"weight": 0.5, "density": 0.5, "gamma": 0.1}, {"weight": 2.0, "density": 0.25}]
    out = merge("breadcrumbs", [d1, d2], inputs, {"lambda": 0.5})
    expected = 0.5 * (0.5 * magnitude_outliers(d1, 0.5, 0.1) + 2.0 * magnitude_outliers(d2, 0.25, 0.01))
    torch.testing.assert_close(out, expected)


# --- sign election and the disjoint mean ---


def test_sign_elected_by_mass_not_count() -> None:
    deltas = [torch.tensor([0.1]), torch.tensor([0.1]), torch.tensor([-1.0])]
    inputs = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.5}]  # weighted: 0.1 + 0.1 − 0.5 < 0
    assert merge("ties", deltas, inputs).item() == pytest.approx(-1.0)  # −0.5 / 0.5, positives dropped
    assert merge("ties", deltas, inputs, {"normalize": False}).item() == pytest.approx(-0.5)
    # the vote counts weighted deltas: negating the third weight flips its vote and drops nothing
    flipped = [{"weight": 1.0}, {"weight": 1.0}, {"weight": -0.5}]
    assert merge("ties", deltas, flipped, {"normalize": False}).item() == pytest.approx(0.7)


def test_disjoint_mean_hand_example() -> None:
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([3.0, 1.0, -1.0, 2.0])
    # entry 0: both +, (1+3)/2; entry 1: sum −1 → −, only a; entry 2: +, only a; entry 3: a's 0 never agrees
    out = merge("ties", [a, b], [{}, {}])
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 3.0, 2.0]))
    # weights 1 and 3: entry 1 sums to +1 → only b (3/3); entry 2 sums to exactly 0, which elects +
    out = merge("ties", [a, b], [{"weight": 1}, {"weight": 3}], {"lambda": 2.0})
    torch.testing.assert_close(out, 2.0 * torch.tensor([10 / 4, 1.0, 3.0, 2.0]))


def test_ties_trims_before_electing() -> None:
    a = torch.tensor([4.0, 0.1, -0.2, 3.0])
    b = torch.tensor([-1.0, -0.5, 2.0, 0.3])
    out = merge("ties", [a, b], [{"density": 0.5}, {"density": 0.5}])
    # a keeps 4, 3; b keeps −1, 2. Entry 0: + elected, b dropped; entry 3: b's 0.3 was trimmed, so 3 (not 1.65)
    torch.testing.assert_close(out, torch.tensor([4.0, 0.0, 2.0, 3.0]))


def test_ties_weights_summing_to_zero_allowed_divisor_zero_rule() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])
    # weighted: [1, 2] and [1, −1]; entry 0: both agree, divisor 1 − 1 = 0 → 1 (mergekit): sum 2
    out = merge("ties", [a, b], [{"weight": 1}, {"weight": -1}])
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0]))


# --- DARE ---


def test_dare_reproducible_from_seed_and_leaves_global_rng_alone() -> None:
    delta = randn(32, 32)
    state = torch.get_rng_state()
    one = dare(delta, 0.4, gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(one, dare(delta, 0.4, gen(7)))
    assert not torch.equal(one, dare(delta, 0.4, gen(8)))
    inputs = [{"density": 0.4}, {"density": 0.6}]
    assert torch.equal(
        merge("dare_ties", [delta, -delta], inputs, seed=3), merge("dare_ties", [delta, -delta], inputs, seed=3)
    )


def test_dare_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="Generator"):
        merge("dare_linear", [randn(4)], [{"density": 0.5}], seed=None)


def test_dare_kept_fraction_close_to_density() -> None:
    delta = randn(20_000) + 10  # no zeros
    out = dare(delta, 0.3, gen(1))
    fraction = float((out != 0).float().mean())
    assert abs(fraction - 0.3) < 0.02  # std ≈ 0.0032


def test_dare_rescale_preserves_l1_and_mean() -> None:
    delta = randn(256, seed=4)
    out = dare(delta, 0.3, gen(0), rescale=True)
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    kept = out != 0
    ratio = out[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one scale for the whole tensor
    average = torch.stack([dare(delta, 0.3, gen(s), rescale=True) for s in range(400)]).mean(dim=0)
    relative = (average - delta).abs().mean() / delta.abs().mean()
    assert relative < 0.12  # ≈ 0.06 expected; without rescale it would be ≈ 0.7


def test_dare_without_rescale_keeps_values() -> None:
    delta = randn(500)
    out = merge("dare_linear", [delta], [{"density": 0.5}], {"rescale": False})
    kept = out != 0
    assert 0 < int(kept.sum()) < 500
    assert torch.equal(out[kept], delta[kept])


def test_density_one_is_no_sparsification() -> None:
    d1, d2 = randn(6, 5, seed=1), randn(6, 5, seed=2)
    inputs = [{"weight": 0.7}, {"weight": 0.4}]
    plain = merge("task_arithmetic", [d1, d2], inputs)
    for name in ["dare_linear", "breadcrumbs"]:
        torch.testing.assert_close(merge(name, [d1, d2], inputs), plain)


# --- task arithmetic, lambda, linear ---


def test_task_arithmetic_is_weighted_sum_by_default() -> None:
    d1, d2, d3 = randn(3, 4, seed=1), randn(3, 4, seed=2), randn(3, 4, seed=3)
    inputs = [{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.25}]
    out = merge("task_arithmetic", [d1, d2, d3], inputs)  # mergekit: normalize false by default
    torch.testing.assert_close(out, d1 + 0.5 * d2 - 0.25 * d3)
    out = merge("task_arithmetic", [d1, d2, d3], inputs, {"normalize": True})
    torch.testing.assert_close(out, (d1 + 0.5 * d2 - 0.25 * d3) / 1.25)


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_lambda_scales(name: str) -> None:
    deltas = [randn(7, 9, seed=1), randn(7, 9, seed=2)]
    inputs: list[dict[str, Any]] = [{"weight": 0.6}, {"weight": 0.9}]
    if name != "task_arithmetic":
        inputs = [{**p, "density": 0.5} for p in inputs]
    base = merge(name, deltas, inputs)
    torch.testing.assert_close(merge(name, deltas, inputs, {"lambda": 2.5}), 2.5 * base)
    assert base.abs().sum() > 0


def test_linear_normalize_on_and_off() -> None:
    a, b = randn(3, 3, seed=1), randn(3, 3, seed=2)
    inputs = [{"weight": 1.0}, {"weight": 3.0}]
    torch.testing.assert_close(merge("linear", [a, b], inputs), (a + 3 * b) / 4)  # normalize defaults to true
    torch.testing.assert_close(merge("linear", [a, b], inputs, {"normalize": False}), a + 3 * b)
    torch.testing.assert_close(merge("linear", [a, b], [{}, {}]), (a + b) / 2)


def test_linear_fn_refuses_zero_weight_sum_directly() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        linear([randn(2), randn(2)], [InputParams(weight=1), InputParams(weight=-1)], LinearConfig(), None)


# --- every method ---


@pytest.mark.parametrize("name", ["linear", *TASK_VECTOR_METHODS])
def test_every_method_runs_shape_dtype_and_leaves_inputs(name: str) -> None:
    method = METHODS.get(name)
    tensors = [randn(5, 6, seed=s).to(torch.bfloat16) for s in range(3)]
    copies = [t.clone() for t in tensors]
    inputs: list[dict[str, Any]] = [{"weight": 0.5}, {"weight": 1.0}, {"weight": 0.25}]
    if method.input_cls is not InputParams:
        inputs = [{**p, "density": 0.5} for p in inputs]
    out = merge(name, tensors, inputs)
    assert out.shape == (5, 6)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies, strict=True))
    float_inputs = [t.float() for t in tensors]
    snapshot = [t.clone() for t in float_inputs]
    merge(name, float_inputs, inputs)  # float32 inputs pass through uncopied: must not be written to
    assert all(torch.equal(t, c) for t, c in zip(float_inputs, snapshot, strict=True))


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_sliced_elementwise_part_changes_no_bit(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors run the per-entry part in slices (memory); every bit equals the one-pass result, including
    slices that do not divide the tensor, negative weights and entries no input agrees on."""
    import merging.methods.task_arithmetic as task_arithmetic

    tensors = [randn(33, 31, seed=s) for s in range(3)]
    tensors[2][:5] = 0.0  # whole rows without a vote
    inputs: list[dict[str, Any]] = [{"weight": 0.7}, {"weight": -0.4}, {"weight": 1.3}]
    if METHODS.get(name).input_cls is not InputParams:
        inputs = [{**p, "density": d} for p, d in zip(inputs, (0.3, 0.6, 0.5), strict=True)]
    params = {"normalize": True, "lambda": 0.9} if name != "task_arithmetic" else {"lambda": 0.9}
    if "dare" in name:
        params["rescale"] = True
    whole = merge(name, tensors, inputs, params)
    monkeypatch.setattr(task_arithmetic, "SLICE_ENTRIES", 100)  # 1023 entries: 11 slices, the last short
    sliced = merge(name, tensors, inputs, params)
    assert sliced.shape == whole.shape and torch.equal(sliced, whole)
    assert torch.count_nonzero(whole) > 0


def test_registered_methods_and_mergekit_defaults() -> None:
    assert METHODS.names() == sorted(["linear", *TASK_VECTOR_METHODS])
    expected: dict[str, dict[str, Any]] = {  # mergekit 0.1.5, mergekit/merge_methods/registry.py
        "task_arithmetic": {"normalize": False, "lambda": 1.0},
        "ties": {"normalize": True, "rescale": False, "lambda": 1.0},
        "breadcrumbs": {"normalize": False, "rescale": False},
        "breadcrumbs_ties": {"normalize": False, "rescale": False},
        "dare_linear": {"normalize": False, "rescale": True},
        "dare_ties": {"normalize": False, "rescale": True},
        "linear": {"normalize": True},
    }
    for name, defaults in expected.items():
        method = METHODS.get(name)
        encoded = _encode(method.defaults())
        assert {k: encoded[k] for k in defaults} == defaults, name
        assert method.random == name.startswith("dare")
        assert method.task_vectors == (name != "linear")
    _, (params,) = METHODS.configure("breadcrumbs", {}, [{}])
    assert _encode(params) == {"weight": 1.0, "density": 1.0, "gamma": 0.01}


def _encode(struct: Any) -> dict[str, Any]:
    import msgspec

    decoded: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(struct))
    return decoded


# --- validation ---


def test_unknown_method() -> None:
    with pytest.raises(ValidationFailed) as info:
        METHODS.get("slerp_ish")
    assert info.value.param == "method"
    assert "ties" in info.value.message


def test_lambda_key_and_unknown_parameter() -> None:
    config, _ = METHODS.configure("ties", {"lambda": 0.5, "int8_mask": True}, [{}])
    assert getattr(config, "lambda_", None) == 0.5
    cases: list[tuple[dict[str, Any], str]] = [
        ({"lambda_": 0.5}, "parameters.lambda_"),
        ({"gamma": 0.1}, "parameters.gamma"),
        ({"lambda": "big"}, "parameters.lambda"),
        ({"lambda": math.inf}, "parameters.lambda"),
    ]
    for params, param in cases:
        with pytest.raises(ValidationFailed) as info:
            METHODS.configure("ties", params, [{}])
        assert info.value.param == param
    with pytest.raises(ValidationFailed) as info:
        METHODS.configure("task_arithmetic", {"rescale": True}, [{}])
    assert info.value.param == "parameters.rescale"


def test_unknown_input_parameter() -> None:
    with pytest.raises(ValidationFailed) as info:
        METHODS.configure("ties", {}, [{}, {"gamma": 0.1}])  # gamma belongs to breadcrumbs
    assert info.value.param == "inputs[1].gamma"
    with pytest.raises(ValidationFailed) as info:
        METHODS.configure("linear", {}, [{"density": 0.5}])
    assert info.value.param == "inputs[0].density"


@pytest.mark.parametrize("density", [0, -0.1, 1.5, math.nan])
def test_density_out_of_range_refused(density: float) -> None:
    with pytest.raises(ValidationFailed) as info:
        METHODS.configure("dare_ties", {}, [{"density": 0.5}, {"density": density}])
    assert info.value.param == "inputs[1].density"
    assert "(0, 1]" in info.value.message


def test_gamma_and_weight_refused() -> None:
    with pytest.raises(ValidationFailed) as info:
        METHODS.configure("breadcrumbs", {}, [{"gamma": 1.0}])
    assert info.value.param == "inputs[0].gamma"
    with pytest.raises(ValidationFailed) as info:
        METHODS.configure("linear", {}, [{"weight": math.nan}])
    assert info.value.param == "inputs[0].weight"


def test_inputs_required_and_zero_weight_sum_with_normalize() -> None:
    for name in ["linear", "ties"]:
        with pytest.raises(ValidationFailed) as info:
            METHODS.configure(name, {}, [])
        assert info.value.param == "inputs"
    for name, params in [("linear", {}), ("task_arithmetic", {"normalize": True})]:
        with pytest.raises(ValidationFailed) as info:
            METHODS.configure(name, params, [{"weight": 1}, {"weight": -1}])
        assert info.value.param == "inputs"
        assert "normalize" in info.value.message
    METHODS.configure("linear", {"normalize": False}, [{"weight": 1}, {"weight": -1}])


def test_registry_refuses_bad_registrations() -> None:
    registry = MethodRegistry()
    good = MergeMethod(
        name="avg", help="mean", task_vectors=False, config_cls=LinearConfig, input_cls=InputParams, fn=linear
    )
    registry.register(good)
    bad: list[MergeMethod] = [
        good,  # twice
        MergeMethod(
            name="Not ok", help="x", task_vectors=False, config_cls=LinearConfig, input_cls=InputParams, fn=linear
        ),
        MergeMethod(
            name="nohelp", help=" ", task_vectors=False, config_cls=LinearConfig, input_cls=InputParams, fn=linear
        ),
        MergeMethod(
            name="wrongcfg",
            help="x",
            task_vectors=False,
            config_cls=InputParams,  # type: ignore[arg-type]
            input_cls=InputParams,
            fn=linear,
        ),
    ]
    for method in bad:
        with pytest.raises(ValueError):
            registry.register(method)
    assert registry.names() == ["avg"]
    assert isinstance(registry.get("avg").defaults(), MethodConfig)
