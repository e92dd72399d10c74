"""vLLM general plugin: faster multi-LoRA ops on CPU (see ``serving/lora_ops.py``).

Registered under the ``vllm.general_plugins`` entry point in pyproject.toml, so vLLM calls :func:`register`
in every one of its processes (API server, engine core, worker); a patch made only in moerge's process would
never reach the worker that runs the model. Managed servers get ``MOERGE_VLLM_LORA_OPS=grouped`` unless
``VLLMConfig.lora_ops`` says ``vllm``; a vLLM server started by hand keeps vLLM's own ops unless that
variable is set in its environment. With ``MOERGE_VLLM_COMPILE=1`` (managed servers unless
``VLLMConfig.compile`` is off) vLLM keeps its compiled model with LoRA on (``serving/vllm_compile.py``).
Both apply on vLLM's CPU platform only: elsewhere (GPU machines) the plugin changes nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from core.settings import COMPILE_ENV, LORA_OPS_CHOICES, LORA_OPS_ENV

__all__ = ["COMPILE_ENV", "LORA_OPS_CHOICES", "LORA_OPS_ENV", "register"]

# A child of vLLM's logger, so the line lands in the server's log beside vLLM's own.
logger = logging.getLogger("vllm.moerge_lora_ops")
PATCHED_MESSAGE = "moerge: vLLM CPU LoRA ops replaced by serving.lora_ops"
COMPILE_MESSAGE = "moerge: vLLM compiles the model with LoRA enabled (serving.vllm_compile)"


def on_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform: moerge's ops and compile patch replace CPU code paths only; a
    stock vLLM on a GPU keeps its own kernels whatever the environment says."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def register() -> None:
    if not on_cpu_platform():
        if os.environ.get(COMPILE_ENV) == "1" or os.environ.get(LORA_OPS_ENV) == "grouped":
            logger.info("moerge: vLLM is not on its CPU platform: its own LoRA kernels and compilation are kept")
        return
    if os.environ.get(COMPILE_ENV) == "1":
        from serving.vllm_compile import install

        install()
        logger.info(COMPILE_MESSAGE)
    if os.environ.get(LORA_OPS_ENV, "vllm") != "grouped":
        return
    from vllm.lora.punica_wrapper import punica_cpu  # the CPU wrapper binds the op names at import

    from serving.lora_ops import OPS, mapping_updated

    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
    wrapper = punica_cpu.PunicaWrapperCPU
    if not getattr(wrapper.update_metadata, "_moerge_hooked", False):
        original = wrapper.update_metadata

        def update_metadata(self: Any, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kw: Any) -> None:
            original(self, mapping, lora_index_to_id, *args, **kw)
            mapping_updated(lora_index_to_id)  # the ops' caches follow vLLM's buffers

        update_metadata._moerge_hooked = True  # type: ignore[attr-defined]
        wrapper.update_metadata = update_metadata  # type: ignore[method-assign]

    wrapper.add_lora_linear = _packed_lora_linear  # type: ignore[method-assign]
    _hook_mixture_slots()
    if os.environ.get(COMPILE_ENV) == "1":
        from serving.vllm_compile import use_packed_plans

        use_packed_plans()
    logger.info("%s (%s, add_lora_linear)", PATCHED_MESSAGE, ", ".join(OPS))


def _hook_mixture_slots() -> None:
    """Mixture slots (serving/mixture/slot.py) in vLLM's worker: when vLLM loads an adapter folder, the op learns
    whether it is a mixture and how to route it; before each forward pass, every token gets its request's vector
    (``vllm_xargs`` under ``REQUEST_KEY``: GLIDER's bias, a weighted mixture's weights)."""
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    if getattr(WorkerLoRAManager._load_adapter, "_moerge_hooked", False):
        return
    load = WorkerLoRAManager._load_adapter

    def _load_adapter(self: Any, lora_request: Any) -> Any:
        from serving.lora_ops import register_mixture
        from serving.mixture.slot import loaded_slot_routing

        model = load(self, lora_request)
        register_mixture(lora_request.lora_int_id, loaded_slot_routing(lora_request.lora_path, model.rank))
        return model

    _load_adapter._moerge_hooked = True  # type: ignore[attr-defined]
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]

    set_active = LoRAModelRunnerMixin.set_active_loras

    def set_active_loras(self: Any, input_batch: Any, num_scheduled_tokens: Any, *args: Any, **kw: Any) -> None:
        from serving.lora_ops import set_request_rows
        from serving.mixture.slot import request_rows

        set_active(self, input_batch, num_scheduled_tokens, *args, **kw)
        requests = getattr(self, "requests", {})
        params = [getattr(requests.get(r), "sampling_params", None) for r in input_batch.req_ids]
        set_request_rows(request_rows([getattr(p, "extra_args", None) for p in params], num_scheduled_tokens))

    LoRAModelRunnerMixin.set_active_loras = set_active_loras  # type: ignore[method-assign]


def _packed_lora_linear(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: Any,
    lora_b_stacked: Any,
    scale: float,
    output_slices: Any,
    **kw: Any,
) -> None:
    """PunicaWrapperCPU.add_lora_linear through :func:`serving.lora_ops.add_lora_linear` (two products a layer)."""
    from serving.lora_ops import add_lora_linear

    # The per-token slot indices: vLLM fills them for prefill and decode alike.
    add_lora_linear(
        y, x.view(-1, x.shape[-1]), lora_a_stacked, lora_b_stacked, scale, output_slices, self.token_lora_indices
    )
