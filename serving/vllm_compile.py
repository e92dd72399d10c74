"""Lets vLLM's CPU build run its compiled model (torch.compile + inductor) with LoRA enabled.

vLLM's CPU platform turns compilation off whenever LoRA is on (``CpuPlatform.check_and_update_config``): its
CPU LoRA path reads Python-side state on every call (the per-token slot indices are a buffer sliced to a
length kept in a Python list, and moerge's ops cache by tensor address), which a graph traced once would freeze
at the values of the first batch. Yet the compiled base model decodes a token in about 28 ms here against 41 ms
eager (bench/vllm_lora_step.py), and at batch 1 that difference is most of a request's wall time.

So each LoRA layer's adapter work becomes one opaque custom op, ``moerge::lora_into``, that Dynamo records
without looking inside: the compiled graph calls it with the layer's input and output and an integer naming
the layer, and the op runs the layer's LoRA work with the mapping of the batch at hand. Everything else (the
base linear layers, norms, attention, activations) is compiled as usual. With moerge's grouped ops
(``serving/lora_ops.py``) a linear layer's work is a plan (the active adapters' packed weights, a mask for mixed
batches) built on the first call after vLLM updates its mapping and reused until the next update: a decode step
then costs a dict lookup and two products per layer instead of vLLM's wrapper Python (at batch 1 the compiled
step with an adapter went from 55.3 to 41.4 ms, bench/RESULTS.md). Otherwise the op calls vLLM's eager LoRA code.

Installed by ``serving.vllm_plugin.register`` in every vLLM process when ``MOERGE_VLLM_COMPILE=1`` (managed
servers set it unless ``VLLMConfig.compile`` is off).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from serving.lora_ops import LAYER_PLANS, apply_linear_plan, linear_plan, remember_layer_plan

OP_NAMESPACE = "moerge"
# Layer key -> the LoRA layer; weak, so an engine torn down in this process frees its layers.
_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count(1)
_installed = False
# Set when moerge's grouped LoRA ops run the punica wrapper (serving/vllm_plugin.py): linear layers then apply
# a plan cached per layer and mapping (serving.lora_ops.LAYER_PLANS) instead of going through vLLM's Python.
_packed_plans = False


def use_packed_plans() -> None:
    global _packed_plans
    _packed_plans = True


def _layer(key: int) -> Any:
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"moerge::lora ops: no LoRA layer with key {key} in this process")
    return layer


def _lora_into(output: torch.Tensor, x: torch.Tensor, layer_key: int) -> None:
    """Adds layer ``layer_key``'s LoRA term for each token's adapter to ``output`` (the base layer's output)."""
    if not _packed_plans or x.dim() != 2:
        _layer(layer_key)._moerge_eager_lora(x, output)
        return
    # A decode step calls this once per LoRA linear layer (120 times for SmolLM2), with a mapping that rarely changes:
    # the plan is built on the first call after a mapping update and reused until the next.
    plan = LAYER_PLANS.get(layer_key)
    if (plan is None and layer_key not in LAYER_PLANS) or (plan is not None and plan.tokens != x.shape[0]):
        layer = _layer(layer_key)
        plan = linear_plan(
            layer.lora_a_stacked,
            layer.lora_b_stacked,
            1.0,  # vLLM folds each adapter's scaling into its stacked B
            layer.output_slices,
            layer.punica_wrapper.token_lora_indices,
            x.shape[0],
            output.dtype,
        )
        remember_layer_plan(layer_key, plan)
    if plan is not None:
        apply_linear_plan(plan, output, x)


def _lora_embedding(input_ids: torch.Tensor, layer_key: int) -> torch.Tensor:
    """The embedding layer ``layer_key`` with its LoRA term: vLLM's eager forward of that layer."""
    return _layer(layer_key)._moerge_eager_forward(input_ids)  # type: ignore[no-any-return]


def _lora_embedding_shape(input_ids: torch.Tensor, layer_key: int) -> torch.Tensor:
    weight = _layer(layer_key).base_layer.weight
    return input_ids.new_empty((*input_ids.shape, weight.shape[1]), dtype=weight.dtype)


# Defined through torch.library.Library rather than the torch.library.custom_op decorator: a call costs about
# 3 us instead of about 23 (measured here), and a decode step makes one per LoRA layer (121 for SmolLM2).
_LIBRARY = torch.library.Library(OP_NAMESPACE, "DEF")
_LIBRARY.define("lora_into(Tensor(a!) output, Tensor x, int layer_key) -> ()")
_LIBRARY.impl("lora_into", _lora_into, "CPU")
_LIBRARY.impl("lora_into", lambda output, x, layer_key: None, "Meta")
_LIBRARY.define("lora_embedding(Tensor input_ids, int layer_key) -> Tensor")
_LIBRARY.impl("lora_embedding", _lora_embedding, "CPU")
_LIBRARY.impl("lora_embedding", _lora_embedding_shape, "Meta")


def _keyed_init(original: Any) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._moerge_key = next(_NEXT_KEY)
        _LAYERS[self._moerge_key] = self

    return __init__


def install() -> None:
    """Patches vLLM (once per process): the platform keeps compilation with LoRA, and the LoRA layers route
    their adapter work through the opaque ops while Dynamo traces (eager calls keep the direct path)."""
    global _installed
    if _installed:
        return
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA
    from vllm.platforms.cpu import CpuPlatform

    check = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        lora_config = vllm_config.lora_config
        # Fully sharded LoRA layers call vLLM's shrink / expand ops from their own forward, outside the layers
        # patched below: those servers stay eager, as vLLM runs them.
        if lora_config is None or getattr(lora_config, "fully_sharded_loras", False):
            check(cls, vllm_config)
            return
        # The platform's only use of lora_config here is to switch compilation off; hide it for that call.
        vllm_config.lora_config = None
        try:
            check(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora_config

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign,assignment]

    for layer_cls in (BaseLinearLayerWithLoRA, VocabParallelEmbeddingWithLoRA):
        layer_cls.__init__ = _keyed_init(layer_cls.__init__)  # type: ignore[method-assign]

    eager_lora = BaseLinearLayerWithLoRA._apply_lora_to_output
    BaseLinearLayerWithLoRA._moerge_eager_lora = eager_lora  # type: ignore[attr-defined]

    def _apply_lora_to_output(self: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return eager_lora(self, x, output)  # type: ignore[no-any-return]
        torch.ops.moerge.lora_into(output, x, self._moerge_key)
        return output

    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output  # type: ignore[method-assign]

    eager_embedding = VocabParallelEmbeddingWithLoRA.forward
    VocabParallelEmbeddingWithLoRA._moerge_eager_forward = eager_embedding  # type: ignore[attr-defined]

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return eager_embedding(self, x)  # type: ignore[no-any-return]
        return torch.ops.moerge.lora_embedding(x, self._moerge_key)  # type: ignore[no-any-return]

    VocabParallelEmbeddingWithLoRA.forward = forward  # type: ignore[method-assign]
    _installed = True
