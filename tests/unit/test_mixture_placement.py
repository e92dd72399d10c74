"""Where a mixture runs beside vLLM (serving/dispatch.py, serving/vllm_mixtures.py): as one adapter slot in a
managed vLLM server when moerge's op runs there (its LoRA ops, vLLM's CPU platform), else on the torch engine.
vLLM's platform is MOCKED here (a GPU machine cannot be had); nothing starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving import vllm_plugin
from serving.dispatch import EngineSet, answering_engine
from serving.engine import GenRequest, Sampling, Target, TokenMixture
from serving.torch_engine import TorchEngine
from serving.vllm import VLLMConfig, VLLMEngine


def _mixture_target(slot: bool = True) -> Target:
    mixture = TokenMixture(
        "mix",
        "arrow",
        "{}",
        (("id", "a", Path("/nowhere")),),
        make_router=lambda: None,  # type: ignore[arg-type,return-value]
        slot_params=json.dumps({"kind": "arrow", "top_k": 1}) if slot else "",
    )
    return Target("base", Path("/nowhere"), served_name="mix", mixture=mixture)


@pytest.mark.parametrize(
    ("cpu", "ops", "remote", "engine"),
    [
        (True, "grouped", False, "vllm"),
        (False, "grouped", False, "torch"),  # MOCKED: stock vLLM on a GPU keeps its own kernels, not moerge's op
        (True, "vllm", False, "torch"),  # vLLM's own ops asked for
        (True, "grouped", True, "torch"),  # a remote server: moerge's op is not known to run there
    ],
)
def test_a_mixture_runs_in_vllm_only_where_moerges_op_runs(
    monkeypatch: pytest.MonkeyPatch, cpu: bool, ops: str, remote: bool, engine: str
) -> None:
    monkeypatch.setattr(vllm_plugin, "on_cpu_platform", lambda: cpu)  # MOCK of vLLM's platform
    config = VLLMConfig(lora_ops=ops, remote_servers={"base": "http://elsewhere:8000"} if remote else {})
    engines = EngineSet(VLLMEngine(config), TorchEngine())
    target = _mixture_target()
    request = GenRequest(target, Sampling(), prompt="hi")
    assert engines.on_torch(request) == (engine == "torch")
    assert answering_engine(engines, target) == engine


def test_a_router_without_a_slot_form_and_fused_requests_stay_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_plugin, "on_cpu_platform", lambda: True)  # MOCK of vLLM's platform
    engines = EngineSet(VLLMEngine(VLLMConfig()), TorchEngine())
    assert answering_engine(engines, _mixture_target(slot=False)) == "torch"
    assert answering_engine(engines, Target("base", Path("/nowhere")), fused=True) == "torch"
    assert answering_engine(engines, Target("base", Path("/nowhere"))) == "vllm"
