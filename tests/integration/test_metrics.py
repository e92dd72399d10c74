"""GET /metrics (Prometheus text format) on an app over tiny models in the torch engine: who may read it, what
/v1 requests, compositions and jobs record and with which labels, several processes' samples summed, and the
admin dashboard's traffic charts drawn from the per-minute rollups.

The metrics of one process are shared by every app it makes (core/metrics.py: the first app fixes the folder),
so each test compares counts before and after what it does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from core import metrics
from registry.schemas import ExpertSpec
from registry.store import ArtifactStore
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register
from tests.fixtures.tiny import build_tiny_finetune, build_tiny_lora
from tests.integration.test_admin_panel import sign_in

TOKEN = "metrics-token-for-the-scraper-0123456789"
CHAT = [{"role": "user", "content": "hello"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def client(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> Iterator[TestClient]:  # type: ignore[type-arg]
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    spec = ExpertSpec(slug="lora-a", base="tiny-base", description="adds two numbers", example_prompts=["12 + 30?"])
    register(registry_env.settings, tiny_lora, spec)
    settings = replace(registry_env.settings, metrics_token=TOKEN, metrics_flush_s=0.2)
    with TestClient(create_app(settings, engine=TorchEngine())) as client:
        yield client


def scrape(client: TestClient) -> Samples:  # type: ignore[type-arg]
    resp = client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    return lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)


def test_metrics_need_an_admin_key_or_the_token(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.json()["error"]["param"] == "authorization"
    refused = client.get("/metrics", headers=registry_env.query)  # a query key: the wrong scope
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
    wrong = client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert client.get("/metrics", params={"key": registry_env.admin_key}).status_code == 401  # never in the URL
    admin = client.get("/metrics", headers=registry_env.admin)
    assert admin.status_code == 200 and "moerge_requests_total" in admin.text
    names = {family.name for family in text_string_to_metric_families(admin.text)}
    assert names and all(name.startswith("moerge_") for name in names), names
    assert scrape(client)  # the token


def test_v1_requests_record_kind_route_tokens_routing_and_failures(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    admin, query = registry_env.admin, registry_env.query
    register(
        registry_env.settings,
        build_tiny_lora(tiny_base, tmp_path / "b", seed=7),
        ExpertSpec(slug="broken-lora", base="tiny-base"),
    )
    for name, expert in (("one", "lora-a"), ("broken-one", "broken-lora")):
        resp = client.post(
            "/api/compositions", json={"name": name, "router": "direct", "experts": [expert]}, headers=admin
        )
        assert resp.status_code == 201, resp.text
    # no expert fits a query this far from lora-a's description: the fallback answers
    picky = {
        "router": "embedding",
        "router_params": {"threshold": 0.95},
        "experts": ["lora-a"],
        "fallback": "tiny-base",
    }
    assert client.post("/api/compositions", json={"name": "picky", **picky}, headers=admin).status_code == 201
    before = scrape(client)
    chat = "/v1/chat/completions"
    for model in ("lora-a", "lora-a", "one", "tiny-base", "picky"):
        body = {"model": model, "messages": CHAT, "max_tokens": 3}
        assert client.post(chat, json=body, headers=query).status_code == 200
    stream = {"model": "one", "messages": CHAT, "max_tokens": 3, "stream": True}
    with client.stream("POST", chat, json=stream, headers=query) as resp:
        assert resp.status_code == 200 and [line for line in resp.iter_lines() if line][-1] == "data: [DONE]"
    assert client.post(chat, json={"model": "nope", "messages": CHAT}, headers=query).status_code == 404
    # the composition's one expert fails for real: its adapter weights vanish from the store
    broken_id = client.get("/api/experts/broken-lora", headers=query).json()["id"]
    (ArtifactStore(registry_env.settings.store_dir).expert_dir(broken_id) / "adapter_model.safetensors").unlink()
    failed = client.post(chat, json={"model": "broken-one", "messages": CHAT, "max_tokens": 3}, headers=query)
    assert failed.status_code == 502, failed.text
    after = scrape(client)
    d = delta(before, after)

    route = "/v1/chat/completions"
    assert d("moerge_requests_total", route=route, kind="adapter", status="200") == 2
    assert d("moerge_requests_total", route=route, kind="base", status="200") == 1
    assert d("moerge_requests_total", route=route, kind="composition", status="200") == 3
    assert d("moerge_requests_total", route=route, kind="", status="404") == 1  # names no model
    assert d("moerge_requests_total", route=route, kind="composition", status="502") == 1
    assert d("moerge_request_duration_seconds_count", route=route, kind="adapter") == 2
    assert d("moerge_request_duration_seconds_sum", route=route, kind="adapter") > 0
    # a route template, not the raw path
    assert d("moerge_requests_total", route="/api/experts/{ref}", kind="", status="200") == 1
    # time to first token: the streamed answer only
    assert d("moerge_time_to_first_token_seconds_count", route=route, kind="composition") == 1
    assert d("moerge_time_to_first_token_seconds_count", route=route, kind="adapter") == 0
    # tokens by kind: 3 completion tokens at most per answer
    assert 2 <= d("moerge_completion_tokens_total", kind="adapter") <= 6
    assert d("moerge_prompt_tokens_total", kind="adapter") > 0
    assert 3 <= d("moerge_completion_tokens_total", kind="composition") <= 9
    # routing: the composition chose its expert for both requests; the failed one's expert is a member failure
    assert d("moerge_router_decisions_total", composition="one", expert="lora-a") == 2
    assert d("moerge_router_decisions_total", composition="broken-one", expert="broken-lora") == 1
    assert d("moerge_member_failures_total", composition="broken-one", expert="broken-lora") == 1
    assert d("moerge_member_failures_total", composition="one", expert="lora-a") == 0
    assert d("moerge_fallbacks_total", composition="one") == 0
    assert d("moerge_fallbacks_total", composition="picky") == 1
    assert d("moerge_router_decisions_total", composition="picky", expert="tiny-base") == 1  # what answered
    assert d("moerge_router_decisions_total", composition="picky", expert="lora-a") == 0


def test_a_job_outcome_and_duration_are_counted(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
    tiny_finetune: Path,
    tmp_path: Path,
) -> None:
    register(registry_env.settings, tiny_finetune, ExpertSpec(slug="ft-a", base="tiny-base"))
    other = build_tiny_finetune(tiny_base, tmp_path / "ft-b", seed=2)
    register(registry_env.settings, other, ExpertSpec(slug="ft-b", base="tiny-base"))
    before = scrape(client)
    config = {
        "merge_method": "linear",
        "models": [{"model": "ft-a", "parameters": {"weight": 0.5}}, {"model": "ft-b", "parameters": {"weight": 0.5}}],
        "name": "ft-linear",
    }
    job = client.post("/api/merges", json=config, headers=registry_env.admin)
    assert job.status_code in (200, 201, 202), job.text
    deadline = time.monotonic() + 60
    while (done := client.get(f"/api/merges/{job.json()['id']}", headers=registry_env.query).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    assert done["status"] == "succeeded", done
    d = delta(before, scrape(client))
    assert d("moerge_jobs_total", kind="merge", status="succeeded") == 1
    assert d("moerge_job_duration_seconds_count", kind="merge", status="succeeded") == 1
    assert d("moerge_job_duration_seconds_sum", kind="merge", status="succeeded") > 0


# What another moerge process records (a `moerge worker`, another replica): it finds the folder the way every
# process does, through PROMETHEUS_MULTIPROC_DIR, counts, notes a vLLM server's state, and exits.
OTHER_PROCESS = """
import os
from pathlib import Path
from core import metrics
metrics.enable(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
metrics.JOBS.labels(kind="merge", status="failed").inc(3)
metrics.server_state("base-of-the-other-process", "ready")
print(os.getpid())
"""


def test_two_processes_counts_add_up_and_an_exited_process_leaves_no_live_gauge(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    folder = metrics.folder()
    assert folder is not None
    before = scrape(client)
    metrics.JOBS.labels(kind="merge", status="failed").inc()  # this process
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    pid = int(done.stdout.strip())
    after = scrape(client)
    assert delta(before, after)("moerge_jobs_total", kind="merge", status="failed") == 4  # 1 here + 3 there
    assert (folder / f"counter_{pid}.db").exists()  # its counts outlive it
    assert not list(folder.glob(f"gauge_live*_{pid}.db"))  # its live gauges went with it
    assert value(after, "moerge_vllm_server_state", base="base-of-the-other-process", state="ready") == 0


def test_dashboard_draws_the_last_hour_from_the_rollups(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
) -> None:
    body = {"name": "routed", "router": "direct", "experts": ["lora-a"]}
    assert client.post("/api/compositions", json=body, headers=registry_env.admin).status_code == 201
    sign_in(client, registry_env.admin_key)
    assert "no requests in the last 60 minutes" in client.get("/admin/").text
    for model in ("lora-a", "lora-a", "lora-a", "routed"):
        resp = client.post(
            "/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 2}, headers=registry_env.query
        )
        assert resp.status_code == 200
    deadline = time.monotonic() + 15
    while 'id="traffic"' not in (page := client.get("/admin/").text) or "routed</strong>" not in page:
        assert time.monotonic() < deadline, "the rollups were not written"  # flushed every 0.2 s here
        time.sleep(0.2)
    rows = page.split('id="traffic"')[1].split("</table>")[0]
    assert _row(rows, "lora-a") == ["adapter", "3", "0"]
    assert _row(rows, "routed") == ["composition", "1", "0"]
    assert 'data-model="lora-a (adapter)"' in page and "<polyline points=" in page
    share = page.split('data-composition="routed"')[1][:1500]
    assert 'title="lora-a: 1 decisions"' in share and "100.0%" in share and "1 decisions</span>" in share


def _row(table: Any, model: str) -> list[str]:
    import re

    for cells in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S):
        tds = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", cells, flags=re.S)]
        if tds and tds[0] == model:
            return tds[1:4]
    raise AssertionError(f"no row for {model} in {table}")
