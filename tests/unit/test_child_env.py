"""What a managed vLLM server inherits from moerge's environment: an allow-list, never moerge's secrets.

A real child process is started through the launcher managed servers use (``VLLMProcess``), with a one-line
Python program in place of vLLM that prints the environment it got.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from core.settings import Settings
from serving.vllm import VLLMConfig, child_env
from serving.vllm_plugin import COMPILE_ENV, LORA_OPS_ENV
from serving.vllm_process import VLLMProcess, server_env

SECRETS = {
    "MOERGE_SESSION_SECRET": "session-secret-value",
    "MOERGE_ADMIN_KEY": "admin-key-value",
    "MOERGE_API_KEY": "api-key-value",
    "MOERGE_DATABASE_URL": "postgresql+asyncpg://moerge:db-password-value@db:5432/moerge",
    "AWS_ACCESS_KEY_ID": "aws-id-value",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/gcp.json",
    "AZURE_CLIENT_SECRET": "azure-secret-value",
    "OPENAI_API_KEY": "openai-key-value",
    "HF_TOKEN": "hf-token-value",  # servers run offline on local folders: the hub token is of no use there
    "HUGGING_FACE_HUB_TOKEN": "hf-token-value-2",
    "VLLM_API_KEY": "vllm-key-value",  # would make the server refuse moerge's own requests
    "GITHUB_TOKEN": "gh-token-value",
}
NEEDED = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/home/someone",
    "USER": "someone",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "TMPDIR": "/var/tmp",
    "LD_LIBRARY_PATH": "/opt/lib",
    "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4",
    "PYTHONPATH": "/opt/py",
    "OMP_NUM_THREADS": "2",
    "KMP_AFFINITY": "granularity=fine",
    "MKL_NUM_THREADS": "2",
    "CUDA_VISIBLE_DEVICES": "",
    "VLLM_LOGGING_LEVEL": "DEBUG",
    "TORCHINDUCTOR_CACHE_DIR": "/var/cache/inductor",
    "TORCH_HOME": "/var/cache/torch",
    "TRITON_CACHE_DIR": "/var/cache/triton",
    "HF_HOME": "/var/cache/hf",
    "XDG_CACHE_HOME": "/var/cache",
    LORA_OPS_ENV: "vllm",
}


def test_only_the_allow_list_reaches_the_child() -> None:
    env = server_env(2, environ={**SECRETS, **NEEDED, "MOERGE_HOME": "/data/moerge", "SOME_TOOL_SETTING": "x"})
    assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
    assert not any(value in env.values() for value in SECRETS.values())
    assert "MOERGE_HOME" not in env and "SOME_TOOL_SETTING" not in env  # not listed: not inherited
    assert {k: env[k] for k in NEEDED} == NEEDED
    # moerge's own settings for the server are there as before
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["HF_HUB_OFFLINE"] == "1" and env["GOMP_SPINCOUNT"] == "1000"


def test_passthrough_names_more_variables() -> None:
    environ = {**SECRETS, "SSL_CERT_FILE": "/etc/ca.pem", "HF_TOKEN": "hf-token-value"}
    env = server_env(2, environ=environ, passthrough=("SSL_CERT_FILE", "HF_TOKEN", "NOT_SET_ANYWHERE"))
    assert env["SSL_CERT_FILE"] == "/etc/ca.pem"
    assert env["HF_TOKEN"] == "hf-token-value"  # named explicitly: the operator's choice
    assert "NOT_SET_ANYWHERE" not in env and "MOERGE_ADMIN_KEY" not in env


def test_passthrough_setting() -> None:
    assert Settings.from_env({}).vllm_env_passthrough == ()
    settings = Settings.from_env({"MOERGE_VLLM_ENV_PASSTHROUGH": " SSL_CERT_FILE, HF_TOKEN ,"})
    assert settings.vllm_env_passthrough == ("SSL_CERT_FILE", "HF_TOKEN")
    with pytest.raises(ValueError, match="MOERGE_VLLM_ENV_PASSTHROUGH"):
        Settings.from_env({"MOERGE_VLLM_ENV_PASSTHROUGH": "A=B"})


def test_a_started_child_sees_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The environment managed servers get (``child_env``, as ``VLLMEngine`` builds it), given to a real process
    by the launcher managed servers use, with this process's environment full of secrets."""
    for name, value in {**SECRETS, "SSL_CERT_FILE": "/etc/ca.pem", "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(name, value)
    config = VLLMConfig(env_passthrough=("SSL_CERT_FILE",), lora_ops="grouped", compile=False, cpu_threads_bind="0")
    program = "import json, os; print('ENV=' + json.dumps(dict(os.environ)))"
    proc = VLLMProcess([sys.executable, "-c", program], child_env(config), tmp_path / "child.log")
    proc.start()
    deadline = time.monotonic() + 30
    while proc.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.forget()
    assert proc.returncode == 0, proc.log_tail()
    (line,) = [ln for ln in (tmp_path / "child.log").read_text().splitlines() if ln.startswith("ENV=")]
    seen = json.loads(line.removeprefix("ENV="))
    assert not set(SECRETS) & set(seen), sorted(set(SECRETS) & set(seen))
    assert not any(value in line for value in SECRETS.values())
    assert seen["PATH"] and seen["OMP_NUM_THREADS"] == "2" and seen["SSL_CERT_FILE"] == "/etc/ca.pem"
    assert seen[LORA_OPS_ENV] == "grouped" and seen[COMPILE_ENV] == "0"  # what moerge's plugin reads in vLLM
    assert seen["VLLM_CPU_OMP_THREADS_BIND"] == "0" and seen["VLLM_NO_USAGE_STATS"] == "1"
