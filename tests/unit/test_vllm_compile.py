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
