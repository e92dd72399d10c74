"""moerge's multi-LoRA ops (serving/lora_ops.py) against vLLM's own CPU reference ops, on every path."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops import torch_ops as reference

from serving import lora_ops

HIDDEN, WIDE, RANK = 64, 96, 8


def _weights(slots: int, rows: int, cols: int, *, four_d: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(slots, rows, cols, generator=gen)
    return w.unsqueeze(1) if four_d else w


@pytest.mark.parametrize("slots", [3, 40])  # 3 x rank 8: every-slot product; 40 x 8 = 320 > 256: grouped
@pytest.mark.parametrize("four_d", [False, True])
def test_bgmv_equals_vllm_reference(slots: int, four_d: bool) -> None:
    gen = torch.Generator().manual_seed(slots)
    tokens = 37
    x = torch.randn(tokens, HIDDEN, generator=gen)
    indices = torch.randint(0, slots, (tokens,), generator=gen)
    a = _weights(slots, RANK, HIDDEN, four_d=four_d, seed=1)
    b = _weights(slots, WIDE, RANK, four_d=four_d, seed=2)
    shrunk = {}
    for name, ops in (("ref", reference), ("ours", lora_ops)):
        y = torch.zeros(tokens, RANK)
        ops.bgmv_shrink(x, a, y, indices, 0.5)
        shrunk[name] = y
    torch.testing.assert_close(shrunk["ours"], shrunk["ref"], rtol=1e-4, atol=1e-4)
    y = shrunk["ref"]
    for add in (True, False):
        start = torch.randn(tokens, WIDE + 10, generator=gen)
        out_ref, out_ours = start.clone(), start.clone()
        reference.bgmv_expand_slice(y, b, out_ref, indices, 5, WIDE, add)
        lora_ops.bgmv_expand_slice(y, b, out_ours, indices, 5, WIDE, add)
        torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-4)
        out_ref, out_ours = start.clone(), start.clone()
        reference.bgmv_expand(y, b, out_ref, indices, add)
        lora_ops.bgmv_expand(y, b, out_ours, indices, add)
        torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-4)
        assert not torch.equal(out_ours, start)  # the op did write


@pytest.mark.parametrize("slots", [4, 40])
def test_sgmv_prefill_equals_vllm_reference(slots: int) -> None:
    gen = torch.Generator().manual_seed(7)
    seq_lens = torch.tensor([5, 1, 9, 3])
    per_seq = torch.tensor([2, 0, 2, 1]) % slots
    tokens = int(seq_lens.sum())
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    meta = (starts, seq_lens, per_seq, 4, int(seq_lens.max()), tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    a = _weights(slots, RANK, HIDDEN, four_d=True, seed=3)
    b = _weights(slots, WIDE, RANK, four_d=True, seed=4)
    results = {}
    for name, ops in (("ref", reference), ("ours", lora_ops)):
        y = torch.zeros(tokens, RANK)
        ops.sgmv_shrink(x, a, y, *meta, 2.0)
        out = torch.ones(tokens, 3 * WIDE)
        ops.sgmv_expand(y, b, out, *meta, True)
        ops.sgmv_expand_slice(y, b, out, *meta, WIDE, WIDE, True)
        results[name] = (y, out)
    for ours, ref in zip(results["ours"], results["ref"], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slots", [3, 40])
def test_tokens_without_an_adapter_get_nothing(slots: int) -> None:
    """Index -1 is "no adapter": zero from shrink, output untouched by expand (vLLM's reference op would
    index the last slot instead)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, HIDDEN, generator=gen)
    indices = torch.tensor([0, -1, 1, -1, 2, 0])
    a = _weights(slots, RANK, HIDDEN, four_d=False, seed=5)
    b = _weights(slots, WIDE, RANK, four_d=False, seed=6)
    y = torch.full((6, RANK), 9.0)
    lora_ops.bgmv_shrink(x, a, y, indices, 1.0)
    assert torch.all(y[indices < 0] == 0) and torch.all(y[indices >= 0] != 0)
    torch.testing.assert_close(y[0], a[0] @ x[0])
    ones = torch.randn(6, RANK, generator=gen)
    out = torch.zeros(6, WIDE)
    lora_ops.bgmv_expand(ones, b, out, indices, True)
    assert torch.all(out[indices < 0] == 0)
    torch.testing.assert_close(out[4], b[2] @ ones[4])


def test_single_row_input_is_broadcast_like_vllm() -> None:
    b = _weights(2, WIDE, RANK, four_d=False, seed=8)
    y = torch.randn(1, RANK)
    out_ref, out_ours = torch.zeros(3, WIDE), torch.zeros(3, WIDE)
    reference.bgmv_expand(y, b, out_ref, torch.tensor([1]), True)
    lora_ops.bgmv_expand(y, b, out_ours, torch.tensor([1]), True)
    torch.testing.assert_close(out_ours, out_ref)
    assert torch.any(out_ours[0] != 0) and torch.equal(out_ours[1], out_ours[0])


def test_plugin_patches_the_cpu_wrapper_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    from serving import vllm_plugin

    originals = {name: getattr(punica_cpu, name) for name in lora_ops.OPS}
    monkeypatch.setenv(vllm_plugin.LORA_OPS_ENV, "vllm")
    vllm_plugin.register()
    assert all(getattr(punica_cpu, n) is f for n, f in originals.items())
    wrapper = punica_cpu.PunicaWrapperCPU
    assert "add_lora_linear" in vars(wrapper)  # vLLM's own, before the plugin
    for name, original in originals.items():
        monkeypatch.setattr(punica_cpu, name, original)  # restored after the test
    for method in ("update_metadata", "add_lora_linear"):
        monkeypatch.setattr(wrapper, method, getattr(wrapper, method))
    vllms_linear = wrapper.add_lora_linear
    monkeypatch.setenv(vllm_plugin.LORA_OPS_ENV, "grouped")
    vllm_plugin.register()
    assert all(getattr(punica_cpu, n) is f for n, f in lora_ops.OPS.items())
    assert wrapper.add_lora_linear is not vllms_linear
    assert getattr(wrapper.update_metadata, "_moerge_hooked", False)


def test_caches_follow_vllms_mapping_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two mapping updates the same index buffer and weights give cached derivations; after an
    update (vLLM refilled the buffers in place) the results follow the new contents."""
    monkeypatch.setattr(lora_ops._Caches, "enabled", False)
    for name in ("one_hot", "per_token", "expand_weights", "zero"):
        monkeypatch.setattr(lora_ops._Caches, name, {})
    gen = torch.Generator().manual_seed(11)
    buffer = torch.zeros(16, dtype=torch.long)  # vLLM's persistent index buffer
    b = _weights(3, WIDE, RANK, four_d=True, seed=9)
    y = torch.randn(5, RANK, generator=gen)

    def step(indices: list[int]) -> torch.Tensor:
        view = buffer[: len(indices)]
        out_ours, out_ref = torch.zeros(5, WIDE), torch.zeros(5, WIDE)
        lora_ops.bgmv_expand(y, b, out_ours, view, True)
        reference.bgmv_expand(y, b, out_ref, view, True)
        torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-4)
        return out_ours

    buffer[:5] = torch.tensor([0, 1, 2, 1, 0])
    lora_ops.mapping_updated([7, 8, 9])
    first = step([0] * 5)
    assert len(lora_ops._Caches.one_hot) == 1 and len(lora_ops._Caches.expand_weights) == 1
    assert torch.equal(step([0] * 5), first)  # served from the caches
    buffer[:5] = torch.tensor([2, 2, 0, 0, 1])  # vLLM refills in place, then tells the wrapper
    b[1].mul_(3.0)  # and a new adapter went into slot 1
    lora_ops.mapping_updated([7, 10, 9])
    assert lora_ops._Caches.expand_weights == {}
    assert not torch.equal(step([0] * 5), first)


def _reference_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a: tuple[torch.Tensor, ...],
    b: tuple[torch.Tensor, ...],
    scale: float,
    slices: tuple[int, ...],
    indices: torch.Tensor,
) -> None:
    """vLLM's PunicaWrapperCPU.add_lora_linear, slice by slice, with vLLM's own reference ops; the -1 rows
    (which the reference op would send to the last slot) are restored afterwards."""
    before = y.clone()
    offset = 0
    for a_i, b_i, width in zip(a, b, slices, strict=True):
        buffer = torch.zeros(x.shape[0], a_i.shape[-2])
        reference.bgmv_shrink(x, a_i, buffer, indices, scale)
        reference.bgmv_expand_slice(buffer, b_i, y, indices, offset, width, True)
        offset += width
    y[indices < 0] = before[indices < 0]


@pytest.mark.parametrize(
    ("slots", "pattern"),
    [
        (4, "one"),  # every token on one slot: the unmasked path
        (4, "mixed"),  # several slots and tokens without an adapter: the masked path
        (16, "mixed"),  # 16 x 3 slices x rank 8 = 384 packed columns > 256: grouped by slot
    ],
)
def test_packed_lora_linear_equals_vllms_slice_by_slice(slots: int, pattern: str) -> None:
    gen = torch.Generator().manual_seed(slots)
    tokens, slices = 23, (WIDE, 32, 32)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    if pattern == "one":
        indices = torch.full((tokens,), 2)
    else:
        indices = torch.randint(-1, slots, (tokens,), generator=gen)
        indices[:3] = torch.tensor([-1, 0, slots - 1])
    a = tuple(_weights(slots, RANK, HIDDEN, four_d=True, seed=10 + i) for i in range(3))
    b = tuple(_weights(slots, width, RANK, four_d=True, seed=20 + i) for i, width in enumerate(slices))
    start = torch.randn(tokens, sum(slices), generator=gen)
    ours, ref = start.clone(), start.clone()
    lora_ops.add_lora_linear(ours, x, a, b, 0.5, slices, indices)
    _reference_lora_linear(ref, x, a, b, 0.5, slices, indices)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours[indices < 0], start[indices < 0])
    assert torch.all((ours != start)[indices >= 0].any(dim=1))


def test_packed_lora_linear_leaves_rows_past_the_indices_alone() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, HIDDEN, generator=gen)
    a = (_weights(2, RANK, HIDDEN, four_d=True, seed=1),)
    b = (_weights(2, WIDE, RANK, four_d=True, seed=2),)
    y = torch.zeros(6, WIDE)
    lora_ops.add_lora_linear(y, x, a, b, 1.0, (WIDE,), torch.tensor([1, 1, 1, 1]))  # vLLM padded x by 2 rows
    torch.testing.assert_close(y[:4], x[:4] @ a[0][1, 0].T @ b[0][1, 0].T, rtol=1e-4, atol=1e-4)
    assert torch.all(y[4:] == 0)


def test_caches_hit_on_fresh_views_under_inference_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM runs the model under torch.inference_mode and passes a new view of its index buffer to every
    call; such views record no base tensor, so the caches must match on memory, not on objects."""
    for name in ("one_hot", "per_token", "expand_weights", "zero", "routing", "packed"):
        monkeypatch.setattr(lora_ops._Caches, name, {})
    monkeypatch.setattr(lora_ops._Caches, "packed_bytes", 0)
    buffer = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0])
    a = (_weights(2, RANK, HIDDEN, four_d=True, seed=3),)
    b = (_weights(2, WIDE, RANK, four_d=True, seed=4),)
    x = torch.randn(4, HIDDEN)
    lora_ops.mapping_updated([5, 6])
    with torch.inference_mode():
        outs = []
        for _ in range(3):
            y = torch.zeros(4, WIDE)
            lora_ops.add_lora_linear(y, x, a, b, 1.0, (WIDE,), buffer[:4])
            out = torch.zeros(4, WIDE)
            lora_ops.bgmv_expand(torch.ones(4, RANK), b[0], out, buffer[:4], True)
            outs.append((y, out))
    assert len(lora_ops._Caches.routing) == 1 and len(lora_ops._Caches.packed) == 1
    assert len(lora_ops._Caches.one_hot) == 1 and len(lora_ops._Caches.expand_weights) == 1
    for y, out in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(out, outs[0][1])


def test_packed_weights_cache_stays_within_its_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches that keep changing their mix of adapters must not grow the packed-weights cache without bound."""
    for name in ("one_hot", "per_token", "expand_weights", "zero", "routing", "packed"):
        monkeypatch.setattr(lora_ops._Caches, name, {})
    monkeypatch.setattr(lora_ops._Caches, "packed_bytes", 0)
    a = (_weights(4, RANK, HIDDEN, four_d=True, seed=1),)
    b = (_weights(4, WIDE, RANK, four_d=True, seed=2),)
    one_slot = RANK * (HIDDEN + WIDE) * 4  # bytes of one slot's packed A and B (float32)
    monkeypatch.setattr(lora_ops, "PACKED_CACHE_BYTES", 3 * one_slot)
    lora_ops.mapping_updated([1, 2, 3, 4])
    x = torch.randn(2, HIDDEN)
    buffer = torch.zeros(2, dtype=torch.long)
    for slot in (0, 1, 2, 3, 0):  # one active slot per mapping; the fourth overflows the budget
        buffer.fill_(slot)
        lora_ops.mapping_updated([1, 2, 3, 4])
        y = torch.zeros(2, WIDE)
        lora_ops.add_lora_linear(y, x, a, b, 1.0, (WIDE,), buffer)
        torch.testing.assert_close(y, x @ a[0][slot, 0].T @ b[0][slot, 0].T, rtol=1e-4, atol=1e-4)
        assert lora_ops._Caches.packed_bytes <= 3 * one_slot
        assert lora_ops._Caches.packed_bytes == len(lora_ops._Caches.packed) * one_slot
    assert len(lora_ops._Caches.packed) == 2  # emptied at the fourth set, then the fourth and the first again


@pytest.mark.parametrize("b_side", ["block", "slices"])
@pytest.mark.parametrize(("slots", "pattern"), [(4, "one"), (4, "mixed"), (40, "mixed")])
def test_packed_lora_linear_drops_vllms_rank_padding(
    slots: int, pattern: str, b_side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM pads an adapter of a smaller rank than --max-lora-rank with zero rows of A (and columns of B); the
    packed layer leaves them out and still equals the reference, an all-zero slot included, whether B is applied
    as one block matrix or slice by slice (a slice's columns spread over several slots: gathered)."""
    monkeypatch.setattr(lora_ops, "BLOCK_PRODUCT_WORK", 10**9 if b_side == "block" else 0)
    monkeypatch.setattr(lora_ops, "BLOCK_PRODUCT_ELEMENTS", 10**9)
    gen = torch.Generator().manual_seed(40 + slots)
    tokens, slices = 19, (WIDE, 32)
    used = [(3 * s) % (RANK + 1) for s in range(slots)]  # 0 (an all-zero slot), 3, 6, 0, ...
    a = tuple(_weights(slots, RANK, HIDDEN, four_d=True, seed=50 + i) for i in range(2))
    b = tuple(_weights(slots, width, RANK, four_d=True, seed=60 + i) for i, width in enumerate(slices))
    for s, rank in enumerate(used):
        for a_i, b_i in zip(a, b, strict=True):
            a_i[s, 0, rank:] = 0
            b_i[s, 0, :, rank:] = 0
    x = torch.randn(tokens, HIDDEN, generator=gen)
    indices = torch.full((tokens,), 1) if pattern == "one" else torch.randint(-1, slots, (tokens,), generator=gen)
    start = torch.randn(tokens, sum(slices), generator=gen)
    ours, ref = start.clone(), start.clone()
    lora_ops.add_lora_linear(ours, x, a, b, 0.5, slices, indices)
    _reference_lora_linear(ref, x, a, b, 0.5, slices, indices)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    active = tuple(int(s) for s in torch.unique(indices[indices >= 0]).tolist())
    packed = lora_ops._packed(a, b, slices, active, torch.float32)
    assert packed.columns == tuple(2 * used[s] for s in active)
    assert packed.a_t.shape[1] == sum(packed.columns) < len(active) * 2 * RANK


def test_a_block_matrix_only_for_few_tokens_and_a_small_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """B goes in one block-matrix product only when both the work and the block (read from memory every step, its
    zeros included) are small; else slice by slice. Both give the reference."""
    monkeypatch.setattr(lora_ops._Caches, "enabled", False)
    slices = (WIDE, 32, 32)
    a = tuple(_weights(2, RANK, HIDDEN, four_d=True, seed=80 + i) for i in range(3))
    b = tuple(_weights(2, width, RANK, four_d=True, seed=90 + i) for i, width in enumerate(slices))
    block_elements = 3 * RANK * sum(slices)  # the slot's columns (3 slices of rank 8) x every slice's outputs
    monkeypatch.setattr(lora_ops, "BLOCK_PRODUCT_WORK", 100)  # tokens x 24 columns <= 100 x 3 slices
    for tokens, elements, blocked in (
        (2, block_elements, True),
        (2, block_elements - 1, False),  # the block is too large
        (64, block_elements, False),  # too many tokens
    ):
        monkeypatch.setattr(lora_ops, "BLOCK_PRODUCT_ELEMENTS", elements)
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        indices = torch.ones(tokens, dtype=torch.long)
        plan = lora_ops.linear_plan(a, b, 0.5, slices, indices, tokens, torch.float32)
        assert plan is not None and (plan.block is not None) == blocked
        ours, ref = torch.zeros(tokens, sum(slices)), torch.zeros(tokens, sum(slices))
        lora_ops.apply_linear_plan(plan, ours, x)
        _reference_lora_linear(ref, x, a, b, 0.5, slices, indices)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_all_zero_weights_are_not_multiplied(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM keeps LoRA buffers for modules no loaded adapter adapts (the vocabulary-wide lm_head's among them): with
    the caches on, such an expand adds nothing without a product (and writes zeros where it would overwrite)."""
    monkeypatch.setattr(lora_ops._Caches, "enabled", False)
    for name in ("one_hot", "per_token", "expand_weights", "zero"):
        monkeypatch.setattr(lora_ops._Caches, name, {})
    zeros = torch.zeros(4, 1, 300, RANK)
    inputs, indices = torch.randn(3, RANK), torch.tensor([0, 1, 3])
    lora_ops.mapping_updated([1, 2, 3, 4])

    def no_product(weights: torch.Tensor) -> torch.Tensor:
        raise AssertionError("an all-zero expand was multiplied")

    monkeypatch.setattr(lora_ops, "_expand_weights", no_product)
    monkeypatch.setattr(lora_ops, "_grouped_product", no_product)
    out = torch.ones(3, 300)
    lora_ops.bgmv_expand(inputs, zeros, out, indices, True)
    assert torch.equal(out, torch.ones(3, 300))
    lora_ops.bgmv_expand(inputs, zeros, out, indices, False)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("slots", [3, 40])
def test_prompt_rows_against_one_requests_sampler_index_use_its_adapter(slots: int) -> None:
    """vLLM's prompt log-probabilities run one request's prompt rows through the LoRA logits path with the batch's
    per-request sampler indices: 4 rows, 1 index. moerge's op raised there (and the engine died); every row gets
    that request's adapter, as vLLM's own op broadcasts it, and rows whose request cannot be told (indices that
    differ) get none."""
    gen = torch.Generator().manual_seed(slots)
    x = torch.randn(4, HIDDEN, generator=gen)
    a = _weights(slots, RANK, HIDDEN, four_d=True, seed=3)
    b = _weights(slots, WIDE, RANK, four_d=True, seed=4)
    one, per_row = torch.tensor([2]), torch.tensor([2, 2, 2, 2])
    expected = torch.zeros(4, RANK)
    reference.bgmv_shrink(x, a, expected, one, 1.0)
    shrunk = {}
    for name, indices in (("one", one), ("per_row", per_row)):
        y = torch.zeros(4, RANK)
        lora_ops.bgmv_shrink(x, a, y, indices, 1.0)
        out = torch.zeros(4, WIDE)
        lora_ops.bgmv_expand(y, b, out, indices, True)
        shrunk[name] = out
    torch.testing.assert_close(shrunk["one"], shrunk["per_row"])
    assert torch.count_nonzero(shrunk["one"]) > 0
    mine = torch.zeros(4, RANK)
    lora_ops.bgmv_shrink(x, a, mine, one, 1.0)
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4)
    y = torch.ones(4, RANK)
    lora_ops.bgmv_shrink(x, a, y, torch.tensor([0, 1]), 1.0)  # two requests' indices for one request's rows
    assert torch.count_nonzero(y) == 0
