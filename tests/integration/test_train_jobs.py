"""`train` jobs through the API on a real server (torch engine, tiny models): a request is checked completely
before anything is queued; the server's worker trains a real LoRA (a few steps of `lora-sft`), registers it in
the transaction that marks the job succeeded, attaches its training data and adds it to a composition; the
expert answers at once; a running training is cancelled between two steps, leaving nothing behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_lora

ROWS = [{"prompt": f"say {w}", "answer": w} for w in ("one", "two", "three", "four")]
QUICK = {"steps": 3, "batch_size": 2, "warmup_steps": 0, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base", task_description="General chat."))
    register(
        settings,
        build_tiny_lora(tiny_base, tmp_path / "first", seed=3),
        ExpertSpec(slug="first-lora", base="tiny-base", example_prompts=["add two numbers"]),
    )
    with serve(settings, TorchEngine()) as url:
        live = {"url": url, "env": registry_env}
        made = _post(live, "/api/compositions", name="auto", router="embedding", experts=["first-lora"])
        assert made.status_code == 201, made.text
        yield live


def _post(live: dict[str, Any], path: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{live['url']}{path}", headers=live["env"].admin, json=body, timeout=60)


def _job(live: dict[str, Any], job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{live['url']}/api/jobs/{job_id}", headers=live["env"].query, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _wait(live: dict[str, Any], job_id: str, done: Any, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = _job(live, job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _train(live: dict[str, Any], slug: str, **overrides: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "recipe": "lora-sft",
        "base": "tiny-base",
        "expert": {"slug": slug, "description": "says numbers", "example_prompts": ["say two"]},
        "params": {"data": {"rows": ROWS}, "recipe": QUICK},
        "add_to": ["auto"],
    }
    return _post(live, "/api/jobs/train", **{**body, **overrides})


def test_training_request_is_checked_before_anything_is_queued(live: dict[str, Any]) -> None:
    cases = [
        ({"recipe": "nope"}, 400, "recipe"),
        ({"base": "first-lora"}, 400, "base"),  # an adapter is not a base
        ({"expert": {"slug": "first-lora"}}, 409, "name"),  # taken
        ({"expert": {"slug": "Bad Slug"}}, 400, "slug"),
        ({"add_to": ["missing"]}, 400, "add_to[0]"),
        ({"params": {"data": {"rows": ROWS}, "recipe": {"rank": 0}}}, 400, "params.recipe"),
        ({"params": {"data": {"source": "no-such-source"}}}, 400, "params.data.source"),
        ({"params": {"data": {"rows": [{"prompt": "p", "answer": ""}]}}}, 400, "params.data"),
        ({"params": {"data": {}}}, 400, "params.data"),
    ]
    for overrides, status, param in cases:
        resp = _train(live, "never", **overrides)
        assert resp.status_code == status, (overrides, resp.text)
        assert resp.json()["error"]["param"] == param, (overrides, resp.json())
    listed = httpx.get(f"{live['url']}/api/jobs?kind=train", headers=live["env"].query, timeout=30).json()
    assert listed["total"] == 0
    assert _post(live, "/api/jobs/train").status_code == 400  # no body at all
    assert httpx.post(f"{live['url']}/api/jobs/train", headers=live["env"].query, json={}).status_code == 403


def test_a_trained_expert_is_registered_attached_added_and_answers(live: dict[str, Any]) -> None:
    resp = _train(live, "counter-lora")
    assert resp.status_code == 202, resp.text
    queued = resp.json()
    assert queued["kind"] == "train" and queued["name"] == "counter-lora" and queued["method"] == "lora-sft"
    again = _train(live, "counter-lora")  # the name is promised to the pending job
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"

    job = _wait(live, queued["id"], lambda j: j["status"] not in ("queued", "running"))
    assert job["status"] == "succeeded", job
    assert job["result_expert"]["slug"] == "counter-lora" and job["progress"] == 1.0
    assert job["result"] == {"rows": len(ROWS), "added_to": ["auto"]}
    assert job["attempts"] == 1 and job["owner"]

    expert = httpx.get(f"{live['url']}/api/experts/counter-lora", headers=live["env"].query).json()
    assert expert["kind"] == "adapter" and expert["lineage"]["source_uri"] == f"train-job:{job['id']}"
    assert expert["compatibility"]["r"] == QUICK["rank"]
    data = httpx.get(f"{live['url']}/api/experts/counter-lora/training-data", headers=live["env"].query).json()
    assert data["rows"] == len(ROWS)
    auto = httpx.get(f"{live['url']}/api/compositions/auto", headers=live["env"].query).json()
    assert auto["experts"] == ["first-lora", "counter-lora"]

    client = openai.OpenAI(base_url=f"{live['url']}/v1", api_key=live["env"].query_key, max_retries=0)
    answer = client.chat.completions.create(model="counter-lora", messages=[{"role": "user", "content": "say two"}])
    assert answer.model == "counter-lora" and answer.choices[0].message.content is not None


def test_cancelling_a_training_stops_it_between_steps(live: dict[str, Any]) -> None:
    long = {**QUICK, "steps": 5000}
    resp = _train(live, "cancelled-lora", params={"data": {"rows": ROWS}, "recipe": long})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    running = _wait(live, job_id, lambda j: j["status"] == "running" and j["progress"] > 0)
    assert running["message"].startswith("training: step ") and "left" in running["message"]
    cancel = httpx.post(f"{live['url']}/api/jobs/{job_id}/cancel", headers=live["env"].admin, timeout=30)
    assert cancel.status_code == 200, cancel.text
    job = _wait(live, job_id, lambda j: j["status"] not in ("queued", "running"), timeout_s=60)
    assert job["status"] == "cancelled" and job["result_expert"] is None and job["progress"] < 0.9
    gone = httpx.get(f"{live['url']}/api/experts/cancelled-lora", headers=live["env"].query)
    assert gone.status_code == 404
    assert not list((live["env"].settings.jobs_dir).glob(f"*{job_id}*"))  # its work folder was removed
