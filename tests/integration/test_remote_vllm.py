"""A vLLM server "on another machine" serves the registry's adapters through moerge's LoRA resolver.

The server (bench/remote.py) runs as a separate process under another Unix user that cannot read moerge's data
directory, with its own HOME and cache, stock vLLM LoRA ops (only the resolver plugin loads, as on a GPU
machine) and the resolver pip-installed into its environment (scripts/setup.sh installs `./resolver` as a user
would). moerge (`moerge serve`, a real subprocess) names it with MOERGE_VLLM_REMOTE. Adapters are registered after
that server started: they answer through moerge (which sends their content-bound id) and straight from the server
by slug; a tampered file is refused; keys keep to their scopes; a merged LoRA is served remotely as soon as its job
ends; a deleted adapter is unloaded there, and a new adapter under the same slug serves its own weights.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.load import MOERGE, Stack, free_port, import_expert, moerge_env
from bench.remote import RemoteVLLM, can_read, remote_vllm
from core.settings import Settings
from registry.store import ArtifactStore
from tests.fixtures.vllm_models import build_vllm_tiny_llama, build_vllm_tiny_lora

pytestmark = pytest.mark.vllm

PROMPTS = ["The quick brown fox", "What is the capital of France?"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("remote")  # under pytest's 0700 folder: nobody else reads MOERGE_HOME
    base = build_vllm_tiny_llama(root / "base")
    loras = {
        name: build_vllm_tiny_lora(base, root / name, seed=seed)
        for name, seed in (("a", 21), ("b", 22), ("c", 23), ("d", 24))
    }
    home = root / "home"
    home.mkdir()
    remote_port = free_port()
    env = moerge_env(home, [root], MOERGE_VLLM_REMOTE=f"tiny=http://127.0.0.1:{remote_port}")
    stack = Stack(home=home, env=env, admin_key="mk-admin-remote-test-0123456789abcdef")
    stack.init()
    subprocess.run(
        [str(MOERGE), "expert", "add", str(base), "--slug", "tiny"], env=env, check=True, capture_output=True
    )
    stack.start_server()
    try:
        stack.start_worker()  # `moerge serve --no-worker` here: merge jobs run in a `moerge worker`
        keys = {
            scope: stack.api("POST", "/api/keys", json={"name": scope, "scopes": [scope]}).json()["key"]
            for scope in ("fetch", "query")
        }
        with remote_vllm(base, moerge_url=stack.url, fetch_key=keys["fetch"], port=remote_port) as server:
            yield {"stack": stack, "server": server, "keys": keys, "loras": loras, "home": home}
    finally:
        stack.stop()


def _complete(url: str, model: str, key: str | None = None) -> list[str]:
    """Greedy completions of PROMPTS by ``model`` at ``url`` (moerge or the vLLM server)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    texts = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=300)
        assert resp.status_code == 200, resp.text
        texts.append(resp.json()["choices"][0]["text"])
    return texts


def _direct_status(server: RemoteVLLM, model: str) -> int:
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 2}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=300).status_code


def test_an_adapter_registered_later_answers_through_moerge_and_directly(live: dict[str, Any]) -> None:
    stack: Stack = live["stack"]
    server: RemoteVLLM = live["server"]
    if server.user is not None:  # as root (CI): the server's user really cannot read moerge's data
        assert not can_read(server.user, live["home"]) and can_read(server.user, server.cache)
    record = import_expert(stack, live["loras"]["a"], "lora-a", base="tiny")
    through_moerge = _complete(stack.url, "lora-a", live["keys"]["query"])
    assert record["id"] in server.models()  # moerge sent the content-bound id; the resolver fetched it
    directly = _complete(server.url, "lora-a")  # a client of the vLLM server names the slug
    assert directly == through_moerge
    assert _complete(stack.url, "tiny", live["keys"]["query"]) != through_moerge  # the adapter changes the output
    assert {"lora-a", record["id"]} <= set(server.models())
    cached = server.cache / record["integrity"]["manifest_sha256"]
    assert cached.is_dir() and (cached / "adapter_model.safetensors").is_file()


def test_a_tampered_file_is_refused(live: dict[str, Any]) -> None:
    stack: Stack = live["stack"]
    server: RemoteVLLM = live["server"]
    record = import_expert(stack, live["loras"]["b"], "lora-b", base="tiny")
    # Its weights: the one file no other adapter here shares (the store keeps one blob per content, and every tiny
    # adapter's adapter_config.json is the same bytes).
    (weights,) = [f for f in record["integrity"]["files"] if f["path"] == "adapter_model.safetensors"]
    blob = ArtifactStore(Settings.from_env(stack.env).store_dir).blob_path(weights["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of the last weight: the store's bytes no longer match the manifest
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    assert _direct_status(server, "lora-b") == 404  # the resolver refused it: vLLM knows no such model
    body = {"model": "lora-b", "prompt": PROMPTS[0], "max_tokens": 2}
    headers = {"authorization": f"Bearer {live['keys']['query']}"}
    refused = httpx.post(f"{stack.url}/v1/completions", json=body, headers=headers, timeout=300)
    assert refused.status_code >= 400 and "lora-b" in refused.json()["error"]["message"]
    assert "lora-b" not in server.models() and record["id"] not in server.models()
    assert not (server.cache / record["integrity"]["manifest_sha256"]).exists()


def test_keys_keep_to_their_scopes(live: dict[str, Any]) -> None:
    stack: Stack = live["stack"]
    import_expert(stack, live["loras"]["c"], "lora-c", base="tiny")
    query, fetch = ({"authorization": f"Bearer {live['keys'][s]}"} for s in ("query", "fetch"))
    assert httpx.get(f"{stack.url}/api/experts/lora-c/files", headers=query).status_code == 403
    assert httpx.get(f"{stack.url}/api/experts/lora-c/files", headers=fetch).status_code == 200
    body = {"model": "lora-c", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{stack.url}/v1/completions", json=body, headers=fetch).status_code == 403
    assert httpx.get(f"{stack.url}/api/experts", headers=fetch).status_code == 403


def test_a_merged_lora_is_served_remotely_as_soon_as_its_job_ends(live: dict[str, Any]) -> None:
    stack: Stack = live["stack"]
    server: RemoteVLLM = live["server"]
    import_expert(stack, live["loras"]["a"], "merge-in-1", base="tiny")
    import_expert(stack, live["loras"]["c"], "merge-in-2", base="tiny")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "tiny",
        "models": [
            {"model": "merge-in-1", "parameters": {"weight": 1.0}},
            {"model": "merge-in-2", "parameters": {"weight": 0.5}},
        ],
        "output": {"format": "lora", "rank": 8},
        "name": "remote-merged",
    }
    resp = stack.api("POST", "/api/merges", json=config)
    assert resp.status_code == 201, resp.text
    deadline = time.monotonic() + 120
    while (job := stack.api("GET", f"/api/merges/{resp.json()['id']}").json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    slug = job["result_expert"]["slug"]
    through_moerge = _complete(stack.url, slug, live["keys"]["query"])  # within a second of registration
    assert _complete(server.url, slug) == through_moerge


def test_deleting_unloads_and_a_new_adapter_under_the_slug_serves_its_own_weights(live: dict[str, Any]) -> None:
    stack: Stack = live["stack"]
    server: RemoteVLLM = live["server"]
    old = import_expert(stack, live["loras"]["a"], "swap", base="tiny", aliases=["swap-alias"])
    old_texts = _complete(stack.url, "swap", live["keys"]["query"])
    assert _complete(server.url, "swap") == old_texts and _complete(server.url, "swap-alias") == old_texts
    assert {"swap", "swap-alias", old["id"]} <= set(server.models())

    assert stack.api("DELETE", "/api/experts/swap").status_code == 204
    assert not {"swap", "swap-alias", old["id"]} & set(server.models())  # unloaded under every name
    assert _direct_status(server, "swap") == 404  # and no longer resolvable

    new = import_expert(stack, live["loras"]["d"], "swap", base="tiny")
    assert new["id"] != old["id"]
    new_texts = _complete(server.url, "swap")
    assert new_texts == _complete(stack.url, "swap", live["keys"]["query"])
    assert new_texts != old_texts  # the new weights, never the old ones cached under the name
