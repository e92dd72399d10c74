"""/api/merges on a live server (uvicorn in a thread, torch engine, tiny models), on SQLite and PostgreSQL:
a TIES merge of two finetunes and a task-arithmetic merge of two LoRAs into a LoRA end as registered
`merged` experts with lineage, equal to the executor run directly and answering at once through /v1; every
refusal is a 4xx naming the field with nothing written; the progress stream ends after the terminal status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from merging.config import check_request, parse_request
from merging.executor import execute
from merging.plan import ModelRef, plan_merge
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.merges import REFUSALS, TIES, build_merge_inputs, register_merge_inputs

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def models(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_merge_inputs(tiny_base, tmp_path_factory.mktemp("merge-inputs"))


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, models: dict[str, Path]) -> Iterator[dict[str, Any]]:
    register_merge_inputs(registry_env.settings, tiny_base, models)
    with serve(registry_env.settings, TorchEngine()) as url:
        yield {"url": url, "env": registry_env, "http": httpx.Client(base_url=url, timeout=60)}


def submit(live: dict[str, Any], body: dict[str, Any] | str) -> httpx.Response:
    env: RegistryEnv = live["env"]
    if isinstance(body, str):
        return live["http"].post("/api/merges", content=body, headers={**env.admin, "content-type": "application/yaml"})
    return live["http"].post("/api/merges", json=body, headers=env.admin)


def wait_done(live: dict[str, Any], job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = live["http"].get(f"/api/merges/{job_id}", headers=live["env"].query).json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def expert(live: dict[str, Any], ref: str) -> dict[str, Any]:
    resp = live["http"].get(f"/api/experts/{ref}", headers=live["env"].query)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def chat(live: dict[str, Any], model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
    resp = live["http"].post("/v1/chat/completions", json=body, headers=live["env"].query)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def no_leftovers(env: RegistryEnv) -> None:
    merges = env.settings.merges_dir
    assert not merges.exists() or not list(merges.iterdir()), list(merges.iterdir())
    assert env.leftovers() == []


def test_ties_merge_registers_a_merged_expert(live: dict[str, Any]) -> None:
    env: RegistryEnv = live["env"]
    resp = submit(live, TIES)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] in ("queued", "running", "succeeded") and job["name"] == "tiny-ties"
    assert job["method"] == "ties" and job["config"]["models"][1]["parameters"]["density"] == 0.3
    assert job["plan"]["base_model"] == "tiny-base" and job["plan"]["output"] == {"format": "full"}

    done = wait_done(live, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["error"] is None
    assert done["result_expert"]["slug"] == "tiny-ties"

    merged = expert(live, "tiny-ties")
    ids = {slug: expert(live, slug)["id"] for slug in ("tiny-base", "ft-a", "ft-b")}
    assert merged["kind"] == "merged" and merged["description"] == "two tiny finetunes, TIES"
    assert merged["lineage"]["base"] == "tiny-base"
    assert merged["lineage"]["parents"] == [ids["tiny-base"], ids["ft-a"], ids["ft-b"]]
    assert merged["lineage"]["merge_job_id"] == job["id"]
    assert {"merged", "ties"} <= set(merged["tags"]) and merged["compatibility"]["peft_type"] is None
    assert {f["path"] for f in merged["integrity"]["files"]} >= {"config.json", "README.md", "moerge_merge.json"}

    # the stored weights are exactly what the executor writes for the same plan
    store = env.store
    refs = [ModelRef(s, store.expert_dir(ids[s]), ids[s], ids["tiny-base"]) for s in ("ft-a", "ft-b")]
    base = ModelRef("tiny-base", store.expert_dir(ids["tiny-base"]), ids["tiny-base"])
    plan = plan_merge(check_request(parse_request(TIES)), base, refs)
    direct = execute(plan, env.settings.home / "direct").folder
    want, got = tensors(direct), tensors(store.expert_dir(merged["id"]))
    assert set(want) == set(got)
    assert all(torch.equal(want[name], got[name]) for name in want)

    listed = live["http"].get("/api/merges", params={"status": "succeeded"}, headers=env.query).json()
    assert listed["total"] == 1 and listed["data"][0]["id"] == job["id"]
    assert chat(live, "tiny-ties")["model"] == "tiny-ties"  # served at once by the torch engine
    # an expert a merge job used stays until the job's record is dropped with force
    refused = live["http"].delete("/api/experts/ft-a", headers=env.admin)
    assert refused.status_code == 409 and "merge job" in refused.json()["error"]["message"]
    no_leftovers(env)


def test_lora_merge_from_yaml_is_a_merged_adapter(live: dict[str, Any]) -> None:
    yaml_body = """
merge_method: task_arithmetic
base_model: tiny-base
models:
  - model: lora-a
    parameters: {weight: 1.0}
  - model: lora-b
    parameters: {weight: 0.5}
output: {format: lora, rank: 8}
"""
    resp = submit(live, yaml_body)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["name"].startswith("task_arithmetic-") and job["config"]["output"] == {"format": "lora", "rank": 8}
    done = wait_done(live, job["id"])
    assert done["status"] == "succeeded", done
    merged = expert(live, done["result_expert"]["slug"])
    assert merged["kind"] == "merged" and merged["lineage"]["base"] == "tiny-base"
    assert merged["compatibility"]["peft_type"] == "LORA" and merged["compatibility"]["r"] == 8
    assert set(merged["compatibility"]["target_modules"]) == {"q_proj", "v_proj", "o_proj"}
    assert {f["path"] for f in merged["integrity"]["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    answer = chat(live, merged["slug"])  # a merged LoRA runs on its base
    assert answer["model"] == merged["slug"] and answer["choices"][0]["message"]["content"] is not None
    no_leftovers(live["env"])


def test_a_mergekit_yaml_with_the_base_among_the_models(live: dict[str, Any]) -> None:
    """As mergekit writes them: the base listed first among the models (not a task vector), per-model
    defaults under the top-level parameters. The job (submitted, then re-planned by the worker from the
    stored ids) merges exactly what the same merge written out merges."""
    env: RegistryEnv = live["env"]
    yaml_body = """
models:
  - model: tiny-base
  - model: ft-a
    parameters: {weight: 1.0, density: 0.5}
  - model: ft-b
    parameters: {weight: 0.7}
merge_method: ties
base_model: tiny-base
parameters: {normalize: true, density: 0.3}
out_dtype: float32
tokenizer_source: base
name: mergekit-style
"""
    job = submit(live, yaml_body).json()
    assert [m["model"] for m in job["plan"]["models"]] == ["ft-a", "ft-b"]
    assert [m["parameters"]["density"] for m in job["plan"]["models"]] == [0.5, 0.3]
    done = wait_done(live, job["id"])
    assert done["status"] == "succeeded", done
    explicit = submit(live, {**TIES, "name": "written-out"}).json()  # TIES: the same merge, spelled out
    assert wait_done(live, explicit["id"])["status"] == "succeeded"
    store = env.store
    got = tensors(store.expert_dir(expert(live, "mergekit-style")["id"]))
    want = tensors(store.expert_dir(expert(live, "written-out")["id"]))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    no_leftovers(env)


def test_refusals_name_the_field_and_write_nothing(live: dict[str, Any]) -> None:
    env: RegistryEnv = live["env"]
    for body, status, param, reason in REFUSALS:
        resp = submit(live, body)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and reason in error["message"], (body, error)
    listing = live["http"].get("/api/merges", headers=env.query).json()
    assert listing["total"] == 0 and listing["data"] == []  # no job row for any refused request
    no_leftovers(env)
    assert live["http"].get("/api/merges/not-a-job", headers=env.query).status_code == 404
    assert live["http"].post("/api/merges", json=TIES, headers=env.query).status_code == 403
    assert live["http"].get("/api/merges", params={"status": "done"}, headers=env.query).status_code == 400


def test_progress_stream_ends_after_the_terminal_status(live: dict[str, Any]) -> None:
    env: RegistryEnv = live["env"]
    job = submit(live, {**TIES, "name": "streamed"}).json()
    events = []
    with live["http"].stream("GET", f"/api/merges/{job['id']}/events", headers=env.query) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events and events[-1]["status"] == "succeeded" and events[-1]["progress"] == 1.0
    assert events[-1]["result_expert"]["slug"] == "streamed"
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress)
    # a finished job cannot be cancelled; its stream is one event
    assert live["http"].post(f"/api/merges/{job['id']}/cancel", headers=env.admin).status_code == 409
    with live["http"].stream("GET", f"/api/merges/{job['id']}/events", headers=env.query) as resp:
        assert [line for line in resp.iter_lines() if line.startswith("data: ")] == [f"data: {json.dumps(events[-1])}"]


def test_racing_merges_for_one_name_the_database_refuses_the_second(
    registry_env: RegistryEnv, tiny_base: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests for one result name that both passed the name check before either was written (the race is
    made certain by skipping the check: a stand-in for timing we cannot force): the database's unique index on
    pending jobs' names refuses the second, which writes no row. Once the first job ends, the name is free."""
    import asyncio

    from sqlalchemy import func, select

    from core.errors import Conflict
    from merging.jobs import MergeJobService
    from registry import db
    from registry.models import Job

    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    for slug in ("ft-a", "ft-b"):
        register(settings, models[slug], ExpertSpec(slug=slug, base="tiny-base"))

    async def skipped_check(self: MergeJobService, name: str) -> None:
        return None

    monkeypatch.setattr(MergeJobService, "check_result_name_free", skipped_check)

    async def run() -> None:
        engine = db.make_engine(settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                jobs = MergeJobService(session, registry_env.store)
                first_id = (await jobs.submit_merge(TIES)).id
                with pytest.raises(Conflict, match="another merge job will register 'tiny-ties'") as refused:
                    await jobs.submit_merge(TIES)
                assert refused.value.param == "name"
                assert await session.scalar(select(func.count()).select_from(Job)) == 1
                await jobs.cancel(first_id)  # queued: cancelled at once, so the name is no longer pending
                again = await jobs.submit_merge(TIES)
                assert again.result_name == "tiny-ties" and again.id != first_id
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_a_merged_lora_above_the_servers_rank_limit_fails_the_job_and_registers_nothing(
    registry_env: RegistryEnv, tiny_base: Path, models: dict[str, Path]
) -> None:
    """The worker registers its result under MOERGE_MAX_LORA_RANK like any upload: a rank-16 LoRA output on a
    server limited to rank 8 ends the job failed, naming the limit, with nothing registered or left behind."""
    import dataclasses

    settings = dataclasses.replace(registry_env.settings, max_lora_rank=8)
    register_merge_inputs(settings, tiny_base, models)
    with serve(settings, TorchEngine()) as url:
        live = {"url": url, "env": registry_env, "http": httpx.Client(base_url=url, timeout=60)}
        body = {
            "merge_method": "task_arithmetic",
            "base_model": "tiny-base",
            "models": [{"model": "lora-a", "parameters": {"weight": 1.0}}, {"model": "lora-b"}],
            "output": {"format": "lora", "rank": 16},
            "name": "too-wide",
        }
        resp = submit(live, body)
        assert resp.status_code == 201, resp.text
        done = wait_done(live, resp.json()["id"])
        assert done["status"] == "failed", done
        assert "MOERGE_MAX_LORA_RANK=8" in (done["error"] or done["message"]), done
        assert live["http"].get("/api/experts/too-wide", headers=registry_env.query).status_code == 404
    no_leftovers(registry_env)
