"""The environment a managed vLLM server starts with (no server is started here)."""

from __future__ import annotations

import pytest

from serving.vllm_process import server_env


def test_short_openmp_spin_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = server_env(2)
    assert env["GOMP_SPINCOUNT"] == "1000"  # torch's threads hand the cores back soon after each parallel region
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert server_env(2)["GOMP_SPINCOUNT"] == "300000"  # an operator's own setting wins
    assert server_env(1.5, {"GOMP_SPINCOUNT": "0"})["GOMP_SPINCOUNT"] == "0"
    assert server_env(1.5)["VLLM_CPU_KVCACHE_SPACE"] == "1.5"


def test_compiled_model_cache_uses_inductors_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    assert server_env(2)["VLLM_USE_AOT_COMPILE"] == "0"  # vLLM's CPU build cannot load its AOT artifacts back
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    assert server_env(2)["VLLM_USE_AOT_COMPILE"] == "1"


def test_compile_setting_is_read_from_the_environment() -> None:
    from core.settings import Settings
    from serving.vllm_plugin import COMPILE_ENV

    assert Settings.from_env({}).vllm_compile is True
    assert Settings.from_env({COMPILE_ENV: "0"}).vllm_compile is False
    with pytest.raises(ValueError, match=COMPILE_ENV):
        Settings.from_env({COMPILE_ENV: "yes"})


def test_compact_json_is_an_option_vllm_accepts() -> None:
    """Managed servers' structured outputs without free whitespace: the flag's JSON must pass vLLM's own config
    checks (with backend `auto` vLLM refused to start: disable_any_whitespace needs xgrammar or guidance)."""
    import json
    from pathlib import Path

    from vllm.config.structured_outputs import StructuredOutputsConfig

    from core.settings import Settings
    from serving.vllm_process import server_command

    common = {"model_dir": Path("/m"), "served_name": "m", "port": 1, "host": "h", "max_lora_rank": 8}
    command = server_command(**common, max_loras=1, max_model_len=64, compact_json=True)
    config = StructuredOutputsConfig(**json.loads(command[command.index("--structured-outputs-config") + 1]))
    assert config.disable_any_whitespace and config.backend == "xgrammar"
    assert "--structured-outputs-config" not in server_command(**common, max_loras=1, max_model_len=64)
    assert Settings.from_env({}).vllm_compact_json
    assert not Settings.from_env({"MOERGE_VLLM_COMPACT_JSON": "0"}).vllm_compact_json
