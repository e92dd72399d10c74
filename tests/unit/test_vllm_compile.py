"""moerge's opaque LoRA ops (serving/vllm_compile.py) inside a torch.compile'd graph, without vLLM: the graph
calls back into each layer's eager code on every run, so adapter state that changes after compilation (vLLM's
per-batch slot mapping, adapters loaded at runtime) is seen, never frozen at trace time."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from serving import vllm_compile


class FakeEmbeddingWithLoRA:
    """Stands in for vLLM's embedding LoRA layer: an embedding plus a per-call offset read at run time."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.base_layer = torch.nn.Embedding(16, 4)
        self.offset = 0.0

    def _moerge_eager_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(input_ids).detach() + self.offset


class FakeLinearWithLoRA:
    """Stands in for vLLM's linear LoRA layer: adds x @ delta where delta is whatever the layer holds now."""

    def __init__(self) -> None:
        self.delta = torch.zeros(3, 5)

    def _moerge_eager_lora(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output.add_(x @ self.delta)


@pytest.fixture
def layers() -> Any:
    embedding, linear = FakeEmbeddingWithLoRA(), FakeLinearWithLoRA()
    vllm_compile._LAYERS[10_001] = embedding
    vllm_compile._LAYERS[10_002] = linear
    yield embedding, linear
    vllm_compile._LAYERS.pop(10_001, None)
    vllm_compile._LAYERS.pop(10_002, None)


def forward(input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    hidden = torch.ops.moerge.lora_embedding(input_ids, 10_001)
    out = (x * 2) @ torch.ones(3, 5)
    torch.ops.moerge.lora_into(out, x, 10_002)
    return hidden.sum(-1, keepdim=True) + out.relu()


def test_compiled_graph_runs_each_layers_current_lora(layers: Any) -> None:
    embedding, linear = layers
    compiled = torch.compile(forward, dynamic=True, fullgraph=True)  # vLLM traces its model once, fullgraph
    ids, x = torch.tensor([1, 2, 3]), torch.randn(3, 3)
    torch.testing.assert_close(compiled(ids, x), forward(ids, x))
    # The adapters change after compilation: the compiled graph must follow, as vLLM's mapping does per batch.
    ids, x = torch.tensor([4, 5, 6, 7, 8]), torch.randn(5, 3)  # another token count, no retrace needed
    stale = forward(ids, x)
    linear.delta = torch.randn(3, 5)
    embedding.offset = 1.5
    want = forward(ids, x)
    assert not torch.allclose(want, stale)
    torch.testing.assert_close(compiled(ids, x), want)


def test_an_unknown_layer_key_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no LoRA layer with key 999999"):
        torch.ops.moerge.lora_into(torch.zeros(1, 2), torch.zeros(1, 2), 999_999)


class FakePunicaWrapper:
    def __init__(self, indices: torch.Tensor) -> None:
        self.token_lora_indices = indices


class FakePackedLinearWithLoRA:
    """vLLM's linear LoRA layer as the packed plans read it: stacked A and B per slice ([slots, 1, rank, in] and
    [slots, 1, out, rank]), the output slices, and the punica wrapper's per-token slot indices."""

    def __init__(self, indices: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(3)
        self.output_slices = (5, 2)
        self.lora_a_stacked = tuple(torch.randn(3, 1, 2, 4, generator=gen) for _ in self.output_slices)
        self.lora_b_stacked = tuple(torch.randn(3, 1, width, 2, generator=gen) for width in self.output_slices)
        self.punica_wrapper = FakePunicaWrapper(indices)

    def _moerge_eager_lora(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise AssertionError("with packed plans the op must not take vLLM's eager path")

    def expected(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Slot by slot, token by token: y[t, slice i] += x[t] @ A_i[slot].T @ B_i[slot].T."""
        want = output.clone()
        for t, slot in enumerate(self.punica_wrapper.token_lora_indices.tolist()):
            offset = 0
            for a, b, width in zip(self.lora_a_stacked, self.lora_b_stacked, self.output_slices, strict=True):
                if slot >= 0:
                    want[t, offset : offset + width] += x[t] @ a[slot, 0].T @ b[slot, 0].T
                offset += width
        return want


def linear_only(x: torch.Tensor) -> torch.Tensor:
    out = (x * 2) @ torch.ones(4, 7)
    torch.ops.moerge.lora_into(out, x, 10_003)
    return out.relu()


def test_packed_plans_follow_each_mapping_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """With moerge's grouped ops installed the op applies a plan cached per layer; vLLM refills its index buffer
    in place and then updates the mapping: the compiled graph must use the new mapping, and a mapping without an
    adapter must leave the base output alone."""
    from serving import lora_ops

    for name in ("one_hot", "per_token", "expand_weights", "zero", "routing", "packed"):
        monkeypatch.setattr(lora_ops._Caches, name, {})
    monkeypatch.setattr(lora_ops._Caches, "packed_bytes", 0)
    monkeypatch.setattr(lora_ops, "LAYER_PLANS", {})
    monkeypatch.setattr(vllm_compile, "LAYER_PLANS", lora_ops.LAYER_PLANS)
    monkeypatch.setattr(vllm_compile, "_packed_plans", True)
    buffer = torch.tensor([1, 1, 1, 0, 0, 0])  # vLLM's persistent index buffer
    layer = FakePackedLinearWithLoRA(buffer[:3])
    monkeypatch.setitem(vllm_compile._LAYERS, 10_003, layer)
    compiled = torch.compile(linear_only, dynamic=True, fullgraph=True)
    x = torch.randn(3, 4)

    def want() -> torch.Tensor:
        return layer.expected(x, (x * 2) @ torch.ones(4, 7)).relu()

    lora_ops.mapping_updated([7, 8, 9])
    torch.testing.assert_close(compiled(x), want())
    assert isinstance(lora_ops.LAYER_PLANS[10_003], lora_ops.LinearPlan)
    torch.testing.assert_close(compiled(x), want())  # served from the cached plan
    buffer[:3] = torch.tensor([2, -1, 0])  # a mixed batch: two adapters and one token without
    lora_ops.mapping_updated([7, 8, 9])
    assert lora_ops.LAYER_PLANS == {}
    mixed = compiled(x)
    torch.testing.assert_close(mixed, want())
    buffer[:3] = -1
    lora_ops.mapping_updated([7, 8, 9])
    torch.testing.assert_close(compiled(x), ((x * 2) @ torch.ones(4, 7)).relu())
    assert lora_ops.LAYER_PLANS == {10_003: None}
