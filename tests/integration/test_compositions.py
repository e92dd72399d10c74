"""Compositions end to end on a live server (torch engine, tiny models, the real MiniLM embedder):
routing, k > 1 with each aggregator, streaming, /api/route and `moerge route`, fallback, a failing
expert left out of the aggregate, deleted experts, and the router's stored per-expert states."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from api.cli import app as cli
from registry import db
from registry.models import Expert, RouterState
from registry.schemas import ExpertSpec
from registry.store import ArtifactStore
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_llama, build_tiny_lora

MATH = ExpertSpec(
    slug="math-lora",
    base="tiny-base",
    task_description="Two-number arithmetic: add, subtract or multiply and give the number.",
    skills=["arithmetic"],
    example_prompts=["What is 12 + 7?", "Compute 45 - 19.", "What is 8 times 6?", "Add 130 and 22."],
)
DATES = ExpertSpec(
    slug="dates-lora",
    base="tiny-base",
    task_description="Rewrite a date given in words as an ISO 8601 date (YYYY-MM-DD).",
    skills=["dates"],
    example_prompts=[
        "Convert 3 March 2021 to ISO format.",
        "Write July 4, 1999 as YYYY-MM-DD.",
        "ISO date of 9 Jan 2020?",
    ],
)
BROKEN = ExpertSpec(
    slug="broken-lora",
    base="tiny-base",
    task_description="Arithmetic with two numbers.",
    example_prompts=["What is 3 + 4?", "Compute 9 - 2."],
)
MATH_QUERY = "What is 17 + 25?"


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base", task_description="General chat."))
    for i, spec in enumerate((MATH, DATES, BROKEN)):
        register(settings, build_tiny_lora(tiny_base, tmp_path / spec.slug, seed=20 + i), spec)
    with serve(settings, TorchEngine()) as url:
        yield {
            "url": url,
            "env": registry_env,
            "admin": registry_env.admin,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key=registry_env.query_key, max_retries=0),
        }


def _create(live: dict[str, Any], **body: Any) -> httpx.Response:
    return httpx.post(f"{live['url']}/api/compositions", headers=live["admin"], json=body, timeout=120)


def _route(live: dict[str, Any], model: str, query: str) -> httpx.Response:
    return httpx.post(
        f"{live['url']}/api/route", headers=live["env"].query, json={"model": model, "query": query}, timeout=60
    )


def _router_states(env: RegistryEnv) -> dict[str, str]:
    """slug -> fingerprint of the stored `embedding` states."""

    async def go() -> dict[str, str]:
        engine = db.make_engine(env.settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                rows = await session.execute(
                    select(Expert.slug, RouterState.fingerprint)
                    .join(RouterState, RouterState.expert_id == Expert.id)
                    .where(RouterState.router == "embedding")
                )
                return {slug: fp for slug, fp in rows}
        finally:
            await engine.dispose()

    return asyncio.run(go())


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_embedding_composition_routes_and_answers(live: dict[str, Any]) -> None:
    resp = _create(live, name="auto", router="embedding", experts=["math-lora", "dates-lora"], fallback="tiny-base")
    assert resp.status_code == 201, resp.text
    # fitted at creation: one stored state per expert
    assert set(_router_states(live["env"])) == {"math-lora", "dates-lora"}

    decision = _route(live, "auto", MATH_QUERY)
    assert decision.status_code == 200, decision.text
    body = decision.json()
    assert body["answered_by"] == ["math-lora"] and not body["fallback"]
    assert set(body["scores"]) == {"math-lora", "dates-lora"}
    assert body["scores"]["math-lora"] > body["scores"]["dates-lora"]
    assert "math-lora" in body["reason"]
    assert decision.headers["x-moerge-router"] == "embedding" and decision.headers["x-moerge-experts"] == "math-lora"
    assert _route(live, "auto", "Convert 12 May 2003 to ISO format.").json()["answered_by"] == ["dates-lora"]

    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0
    )
    direct = client.chat.completions.create(model="math-lora", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0)
    assert raw.parse().choices[0].message.content == direct.choices[0].message.content
    assert raw.parse().model == "auto"
    assert raw.headers["x-moerge-router"] == "embedding"
    assert raw.headers["x-moerge-experts"] == "math-lora" and raw.headers["x-moerge-weights"] == "1"
    assert raw.headers["x-moerge-scores"].startswith("math-lora=")

    # k = 1 streams the routed expert
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="auto", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == direct.choices[0].message.content


def test_fallback_when_no_expert_fits(live: dict[str, Any]) -> None:
    strict = {"threshold": 0.95}
    assert (
        _create(
            live, name="strict", router="embedding", router_params=strict, experts=["math-lora", "dates-lora"]
        ).status_code
        == 201
    )
    no_fallback = _route(live, "strict", "Tell me a story about a dragon.")
    assert no_fallback.status_code == 422 and no_fallback.json()["error"]["code"] == "no_expert_fits"
    assert no_fallback.headers["x-moerge-router"] == "embedding"

    assert (
        _create(
            live,
            name="strict-fb",
            router="embedding",
            router_params=strict,
            experts=["math-lora", "dates-lora"],
            fallback="tiny-base",
        ).status_code
        == 201
    )
    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(
        model="strict-fb", messages=_chat("Tell me a story about a dragon."), max_tokens=4
    )
    assert raw.headers["x-moerge-fallback"] == "true" and raw.headers["x-moerge-experts"] == "tiny-base"
    scores = dict(item.split("=") for item in raw.headers["x-moerge-scores"].split(","))
    assert set(scores) == {"math-lora", "dates-lora"} and all(float(v) < 0.95 for v in scores.values())


@pytest.mark.parametrize("aggregator", ["vote", "synthesize", "select"])
def test_k2_aggregates_and_streams(live: dict[str, Any], aggregator: str) -> None:
    params = {"model": "tiny-base"} if aggregator != "vote" else {}
    resp = _create(
        live,
        name=f"pair-{aggregator}",
        router="embedding",
        router_params={"threshold": -1.0},
        experts=["math-lora", "dates-lora"],
        k=2,
        aggregator=aggregator,
        aggregator_params=params,
    )
    assert resp.status_code == 201, resp.text
    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(
        model=f"pair-{aggregator}", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-moerge-aggregator"] == aggregator
    named = raw.headers["x-moerge-experts"].split(",")
    assert named and set(named) <= {"math-lora", "dates-lora"}
    answers = {
        slug: client.chat.completions.create(model=slug, messages=_chat(MATH_QUERY), max_tokens=6, temperature=0)
        .choices[0]
        .message.content
        for slug in ("math-lora", "dates-lora")
    }
    if aggregator in ("vote", "select"):  # the answer is one of the experts' own answers
        assert reply.choices[0].message.content in answers.values()
    # two experts and (for model aggregators) the aggregator model: usage adds them up
    assert reply.usage is not None and reply.usage.completion_tokens >= 2
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=f"pair-{aggregator}", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == reply.choices[0].message.content


def test_failing_expert_is_left_out_and_named(live: dict[str, Any]) -> None:
    resp = _create(
        live,
        name="with-broken",
        router="embedding",
        router_params={"threshold": -1.0},
        experts=["math-lora", "broken-lora"],
        k=2,
        aggregator="vote",
    )
    assert resp.status_code == 201, resp.text
    # Break the expert for real: its adapter weights vanish from the store, so the engine cannot load it.
    store = ArtifactStore(live["env"].settings.store_dir)
    broken_id = httpx.get(f"{live['url']}/api/experts/broken-lora", headers=live["admin"]).json()["id"]
    (store.expert_dir(broken_id) / "adapter_model.safetensors").unlink()

    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(
        model="with-broken", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0
    )
    alone = client.chat.completions.create(model="math-lora", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-moerge-failed"] == "broken-lora"
    assert raw.headers["x-moerge-experts"] == "math-lora"
    assert raw.parse().choices[0].message.content == alone.choices[0].message.content

    # every chosen expert failing is an error (not a 500), with the routing headers
    assert _create(live, name="only-broken", router="direct", experts=["broken-lora"]).status_code == 201
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="only-broken", messages=_chat(MATH_QUERY), max_tokens=4)
    assert failed.value.status_code == 502 and failed.value.body["code"] == "generation_failed"
    assert failed.value.response.headers["x-moerge-router"] == "direct"


def test_creation_errors_name_the_field(live: dict[str, Any]) -> None:
    cases = [
        ({"router": "embedding", "experts": []}, "experts"),
        ({"router": "embedding", "experts": ["nobody"]}, "experts[0]"),
        ({"router": "nosuch", "experts": ["math-lora"]}, "router"),
        (
            {"router": "embedding", "experts": ["math-lora"], "router_params": {"threshold": 3}},
            "router_params.threshold",
        ),
        ({"router": "embedding", "experts": ["math-lora"], "router_params": {"colour": 1}}, "router_params.colour"),
        ({"router": "embedding", "experts": ["math-lora", "dates-lora"], "k": 2}, "aggregator"),
        ({"router": "embedding", "experts": ["math-lora"], "k": 2, "aggregator": "vote"}, "k"),
        (
            {"router": "embedding", "experts": ["math-lora", "dates-lora"], "k": 2, "aggregator": "nosuch"},
            "aggregator",
        ),
        (
            {"router": "embedding", "experts": ["math-lora", "dates-lora"], "k": 2, "aggregator": "synthesize"},
            "aggregator_params.model",
        ),
    ]
    for body, param in cases:
        resp = _create(live, name="bad", **body)
        assert resp.status_code in (400, 404), (body, resp.text)
        assert resp.json()["error"]["param"] == param, (body, resp.json())
    listed = httpx.get(f"{live['url']}/api/compositions", headers=live["admin"]).json()["data"]
    assert listed == []  # nothing half-created
    assert _route(live, "nosuch", "hi").status_code == 404


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_deleted_expert_is_a_clear_error_at_query_time(live: dict[str, Any]) -> None:
    assert _create(live, name="pair", router="embedding", experts=["math-lora", "dates-lora"]).status_code == 201
    gone = httpx.delete(f"{live['url']}/api/experts/dates-lora", params={"force": True}, headers=live["admin"])
    assert gone.status_code == 204
    resp = _route(live, "pair", MATH_QUERY)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "composition_expert_deleted"
    assert "dates-lora" in resp.json()["error"]["message"]
    with pytest.raises(openai.ConflictError) as query_error:
        live["client"].chat.completions.create(model="pair", messages=_chat(MATH_QUERY))
    assert query_error.value.response.headers["x-moerge-router"] == "embedding"
    # the stored router state of the deleted expert went with it
    assert set(_router_states(live["env"])) == {"math-lora"}


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_adding_an_expert_to_a_composition_fits_it_and_keeps_the_change(live: dict[str, Any]) -> None:
    """The new expert is fitted during the PATCH (its router states are computed with no connection held);
    the change is then stored as asked."""
    assert _create(live, name="growing", router="embedding", experts=["math-lora"]).status_code == 201
    grown = httpx.patch(
        f"{live['url']}/api/compositions/growing", headers=live["admin"], json={"experts": ["math-lora", "dates-lora"]}
    )
    assert grown.status_code == 200, grown.text
    assert grown.json()["experts"] == ["math-lora", "dates-lora"]
    stored = httpx.get(f"{live['url']}/api/compositions/growing", headers=live["admin"]).json()
    assert stored["experts"] == ["math-lora", "dates-lora"]
    assert set(_router_states(live["env"])) == {"math-lora", "dates-lora"}


def test_states_refit_only_the_changed_expert(live: dict[str, Any]) -> None:
    assert _create(live, name="auto", router="embedding", experts=["math-lora", "dates-lora"]).status_code == 201
    before = _router_states(live["env"])
    old_score = _route(live, "auto", "What is 4 + 5?").json()["scores"]["dates-lora"]
    patch = httpx.patch(
        f"{live['url']}/api/experts/dates-lora",
        headers=live["admin"],
        json={"example_prompts": ["Add 4 and 5.", "What is 40 + 2?"]},
    )
    assert patch.status_code == 200, patch.text
    # the next decision sees the new examples: the arithmetic query now also fits dates-lora well
    scores = _route(live, "auto", "What is 4 + 5?").json()["scores"]
    after = _router_states(live["env"])
    assert after["math-lora"] == before["math-lora"] and after["dates-lora"] != before["dates-lora"]
    assert scores["dates-lora"] > old_score + 0.2


def test_cli_route_and_composition_commands(live: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    env: RegistryEnv = live["env"]
    monkeypatch.setenv("MOERGE_HOME", str(env.settings.home))
    monkeypatch.setenv("MOERGE_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("MOERGE_URL", live["url"])
    monkeypatch.setenv("MOERGE_API_KEY", env.query_key)
    runner = CliRunner()
    made = runner.invoke(
        cli,
        ["composition", "create", "cli-auto", "--router", "embedding", "-e", "math-lora", "-e", "dates-lora",
         "--param", "threshold=0.1", "--fallback", "tiny-base", "--json"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["router_params"] == {"threshold": 0.1}
    routed = runner.invoke(cli, ["route", "cli-auto", MATH_QUERY, "--json"])
    assert routed.exit_code == 0, routed.output
    decision = json.loads(routed.stdout)
    assert decision["answered_by"] == ["math-lora"] and set(decision["scores"]) == {"math-lora", "dates-lora"}
    bad = runner.invoke(
        cli, ["composition", "create", "x", "--router", "embedding", "-e", "math-lora", "-p", "top_examples=0"]
    )
    assert bad.exit_code == 1 and "router_params.top_examples" in bad.output
    updated = runner.invoke(cli, ["composition", "update", "cli-auto", "--k", "2", "--aggregator", "vote", "--json"])
    assert updated.exit_code == 0 and json.loads(updated.stdout)["k"] == 2
    listed = runner.invoke(cli, ["composition", "list", "--json"])
    assert [c["name"] for c in json.loads(listed.stdout)["data"]] == ["cli-auto"]
    assert runner.invoke(cli, ["composition", "rm", "cli-auto"]).exit_code == 0
    missing = runner.invoke(cli, ["route", "cli-auto", MATH_QUERY])
    assert missing.exit_code == 1 and "cli-auto" in missing.output


def test_eval_with_oracle_routing_and_recorded_results(
    live: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env: RegistryEnv = live["env"]
    monkeypatch.setenv("MOERGE_URL", live["url"])
    monkeypatch.setenv("MOERGE_API_KEY", env.admin_key)
    assert _create(live, name="auto", router="embedding", experts=["math-lora", "dates-lora"]).status_code == 201
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["eval", "math-lora", "oracle", "auto", "--task", "arithmetic", "--task", "dates", "--n", "2",
         "--expert-for", "arithmetic=math-lora", "--expert-for", "dates=dates-lora", "--out", str(tmp_path),
         "--record", "--concurrency", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["oracle"]["routing_accuracy"] == 1.0 and rows["math-lora"]["routing_accuracy"] is None
    # the embedding router sends arithmetic to math-lora and dates to dates-lora
    assert rows["auto"]["routing_accuracy"] == 1.0
    oracle = {(o["task"], o["experts"]) for o in report["outcomes"]["oracle"]}
    assert oracle == {("arithmetic", "math-lora"), ("dates", "dates-lora")}
    # only the plain expert's results were recorded, one per task
    evals = httpx.get(f"{live['url']}/api/experts/math-lora", headers=live["admin"]).json()["evals"]
    assert sorted((e["task"], e["metric"]) for e in evals) == [("arithmetic", "exact_match"), ("dates", "exact_match")]
    assert httpx.get(f"{live['url']}/api/experts/dates-lora", headers=live["admin"]).json()["evals"] == []


def test_model_running_router_under_many_concurrent_requests(live: dict[str, Any]) -> None:
    """`instruct` asks a model for each query while routing: more requests in flight than the database pool
    holds connections must still all be answered (no request may hold a connection while it waits)."""
    resp = _create(
        live,
        name="instruct",
        router="instruct",
        router_params={"model": "tiny-base", "threshold": -1.0, "max_new_tokens": 4},
        experts=["math-lora", "dates-lora"],
        fallback="tiny-base",
    )
    assert resp.status_code == 201, resp.text

    # `kshot` runs every expert on its examples when first asked: 24 requests at once share one fitting
    examples = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 + 3?", "answer": "6"}]
    resp = _create(
        live,
        name="kshot",
        router="kshot",
        router_params={"examples": examples, "max_new_tokens": 4},
        experts=["math-lora", "dates-lora"],
        fallback="tiny-base",
    )
    assert resp.status_code == 201, resp.text

    async def burst(model: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live["url"], headers=live["env"].query, timeout=120) as client:
            body = {"model": model, "messages": _chat(MATH_QUERY), "max_tokens": 2}
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(24)))

    for model in ("instruct", "kshot"):
        replies = asyncio.run(burst(model))
        assert [r.status_code for r in replies] == [200] * 24, replies[0].text
        assert {r.headers["x-moerge-router"] for r in replies} == {model}
    decision = _route(live, "instruct", MATH_QUERY).json()
    assert "task_description" in decision["extra"]  # what the model wrote, the router matched on


def test_decompose_sends_each_part_to_its_expert(live: dict[str, Any]) -> None:
    body = {
        "router": "embedding",
        "experts": ["math-lora", "dates-lora"],
        "aggregator": "synthesize",
        "aggregator_params": {"model": "tiny-base"},
    }
    refused = _create(live, name="parts", decompose=True, **{**body, "aggregator": "vote", "aggregator_params": {}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "aggregator"
    assert "synthesize" in refused.json()["error"]["message"]
    resp = _create(live, name="parts", decompose=True, **body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["decompose"] is True and resp.json()["k"] == 1

    math_part, dates_part = MATH_QUERY, "Convert 12 May 2003 to ISO format."
    query = f"Answer both questions, one answer per line.\n1. {math_part}\n2. {dates_part}"
    decision = _route(live, "parts", query).json()
    assert decision["answered_by"] == ["math-lora", "dates-lora"]
    assert [(p["text"], p["expert"]) for p in decision["extra"]["parts"]] == [
        (math_part, "math-lora"),
        (dates_part, "dates-lora"),
    ]
    assert [e["weight"] for e in decision["experts"]] == [0.5, 0.5]

    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(
        model="parts", messages=_chat(query), max_tokens=6, temperature=0
    )
    assert raw.headers["x-moerge-experts"] == "math-lora,dates-lora"
    assert raw.headers["x-moerge-aggregator"] == "synthesize"
    answers = raw.parse().model_extra["moerge"]["answers"]  # type: ignore[index]
    for answer, (part, slug) in zip(answers, [(math_part, "math-lora"), (dates_part, "dates-lora")], strict=True):
        alone = client.chat.completions.create(model=slug, messages=_chat(part), max_tokens=6, temperature=0)
        assert (answer["expert"], answer["part"]) == (slug, part)
        assert answer["text"] == alone.choices[0].message.content  # the expert saw its part only

    # a query without numbered parts is routed whole, top-1, with no aggregator run
    whole = client.chat.completions.with_raw_response.create(
        model="parts", messages=_chat(MATH_QUERY), max_tokens=6, temperature=0
    )
    assert whole.headers["x-moerge-experts"] == "math-lora" and "x-moerge-aggregator" not in whole.headers
    # turning it off through the CLI-facing patch keeps everything else
    patched = httpx.patch(
        f"{live['url']}/api/compositions/parts", headers=live["admin"], json={"decompose": False}, timeout=60
    )
    assert patched.status_code == 200 and patched.json()["decompose"] is False
    undecomposed = _route(live, "parts", query).json()
    assert len(undecomposed["answered_by"]) == 1 and "parts" not in undecomposed.get("extra", {})


def test_logit_fusion_decodes_the_chosen_experts_together(live: dict[str, Any], tmp_path: Path) -> None:
    """k = 2 LoRA experts of tiny-base decode one answer together in the torch engine (one fused request,
    no separate answers to combine); streaming gives the same text; creation refuses experts that cannot
    decode together, naming the expert."""
    resp = _create(
        live,
        name="fused",
        router="embedding",
        router_params={"threshold": -1.0},
        experts=["math-lora", "dates-lora", "tiny-base"],
        k=2,
        aggregator="logit_fusion",
        aggregator_params={"mode": "entropy", "tau": 0.5},
    )
    assert resp.status_code == 201, resp.text
    client: Any = live["client"]  # an openai.OpenAI; untyped here, as the chat messages are plain dicts
    raw = client.chat.completions.with_raw_response.create(
        model="fused", messages=_chat(MATH_QUERY), max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-moerge-aggregator"] == "logit_fusion"
    named = raw.headers["x-moerge-experts"].split(",")
    assert len(named) == 2 and set(named) <= {"math-lora", "dates-lora", "tiny-base"}
    extension = reply.model_extra["moerge"] if reply.model_extra else {}
    assert "logit fusion" in extension["aggregation"] and "mean weights" in extension["aggregation"]
    text = reply.choices[0].message.content
    assert text and all(a["text"] == text for a in extension["answers"])  # every member decoded the same tokens
    # one prompt and one answer's tokens, not k of each
    direct = client.chat.completions.create(model=named[0], messages=_chat(MATH_QUERY), max_tokens=8, temperature=0)
    assert reply.usage is not None and direct.usage is not None
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens and reply.usage.completion_tokens <= 8

    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="fused", messages=_chat(MATH_QUERY), max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text

    # experts on another base, or a full fine-tune, cannot decode in tiny-base's batch; k must be >= 2
    settings = live["env"].settings
    other_base = build_tiny_llama(tmp_path / "other-base", hidden_size=48)
    register(settings, other_base, ExpertSpec(slug="other-base", task_description="Another base."))
    register(
        settings,
        build_tiny_lora(other_base, tmp_path / "other-lora", seed=5),
        ExpertSpec(slug="other-lora", base="other-base", task_description="Arithmetic on another base."),
    )
    fused = {"router": "embedding", "k": 2, "aggregator": "logit_fusion"}
    for experts, k, param, named_expert in [
        (["math-lora", "other-lora"], 2, "experts[1]", "other-lora"),
        (["other-base", "math-lora"], 2, "experts[1]", "math-lora"),
        (["math-lora", "dates-lora"], 1, "k", None),
    ]:
        bad = _create(live, name="bad-fused", **{**fused, "experts": experts, "k": k})
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["param"] == param, error
        if named_expert:
            assert f"'{named_expert}'" in error["message"] and "share one base" in error["message"]
