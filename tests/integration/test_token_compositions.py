"""Token-level compositions end to end on a live server (torch engine, tiny models): created through the API
(validated: adapters of one base, k = 1, no aggregator), answered through /v1 (streamed and not, by the
official client), traced through /api/route and the `moerge_trace` request flag, and the EngineSet that
sends mixtures to a torch engine beside vLLM."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from api.cli import app as cli
from registry.schemas import ExpertSpec
from routers.token import TOKEN_ROUTERS
from serving.dispatch import EngineSet, answering_engine
from serving.engine import FusedMember, Fusion, GenRequest, GenResult, Sampling, Target, TokenMixture
from serving.torch_engine import TorchEngine
from serving.vllm import VLLMEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_llama, build_tiny_lora

SLUGS = ("mix-a", "mix-b", "mix-c")
DESCRIPTIONS = (
    "Converts dates written in words to ISO 8601.",
    "Labels the sentiment of a product review.",
    "Sorts a list of integers in ascending order.",
)


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base", task_description="General chat."))
    for i, slug in enumerate(SLUGS):
        spec = ExpertSpec(slug=slug, base="tiny-base", task_description=DESCRIPTIONS[i])
        register(settings, build_tiny_lora(tiny_base, tmp_path / slug, alpha=32, seed=60 + i), spec)
    other = build_tiny_llama(tmp_path / "other-base", seed=5)
    register(settings, other, ExpertSpec(slug="other-base"))
    register(
        settings,
        build_tiny_lora(other, tmp_path / "other-lora", seed=9),
        ExpertSpec(slug="other-lora", base="other-base"),
    )
    with serve(settings, TorchEngine()) as url:
        yield {
            "url": url,
            "env": registry_env,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key=registry_env.query_key, max_retries=0),
        }


def _create(live: dict[str, Any], **body: Any) -> httpx.Response:
    return httpx.post(f"{live['url']}/api/compositions", headers=live["env"].admin, json=body, timeout=120)


def test_token_composition_is_validated(live: dict[str, Any]) -> None:
    cases = [
        ({"experts": list(SLUGS), "k": 2}, "k"),
        ({"experts": list(SLUGS), "aggregator": "vote"}, "aggregator"),
        ({"experts": ["mix-a", "tiny-base"]}, "experts[1]"),
        ({"experts": ["mix-a", "other-lora"]}, "experts[1]"),
        ({"experts": list(SLUGS), "router_params": {"top_k": 0}}, "router_params.top_k"),
        ({"experts": []}, "experts"),
    ]
    for extra, param in cases:
        resp = _create(live, name="bad", router="arrow", **extra)
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] == param, (extra, resp.json())
    resp = _create(live, name="bad", router="no-such-router", experts=list(SLUGS))
    assert resp.status_code == 400 and "arrow" in resp.json()["error"]["message"]  # names the token routers too
    listed = httpx.get(f"{live['url']}/api/compositions", headers=live["env"].admin).json()["data"]
    assert not listed  # nothing half-written


def test_arrow_composition_answers_streams_and_traces(live: dict[str, Any]) -> None:
    resp = _create(live, name="arrow-mix", router="arrow", router_params={"top_k": 2}, experts=list(SLUGS))
    assert resp.status_code == 201, resp.text
    client = live["client"]
    messages = [{"role": "user", "content": "the cat sat on the"}]
    done = client.chat.completions.create(model="arrow-mix", messages=messages, max_tokens=8, temperature=0)
    text = done.choices[0].message.content
    assert text and done.model == "arrow-mix"
    chunks = client.chat.completions.create(
        model="arrow-mix", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    raw = httpx.post(
        f"{live['url']}/v1/chat/completions",
        headers=live["env"].query,
        json={"model": "arrow-mix", "messages": messages, "max_tokens": 8, "temperature": 0, "moerge_trace": True},
        timeout=120,
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-moerge-router"] == "arrow" and raw.headers["x-moerge-experts"] == ",".join(SLUGS)
    assert raw.headers["x-moerge-engine"] == "torch"
    body = raw.json()
    assert body["choices"][0]["message"]["content"] == text
    trace = body["moerge"]["trace"]
    assert trace["experts"] == list(SLUGS) and trace["top_k"] == 2
    n = len(trace["tokens"])
    assert trace["prompt_tokens"] < n  # the answer's tokens are traced too
    for layer in trace["weights"]:
        assert len(layer) == n and all(abs(sum(row) - 1) < 1e-3 for row in layer)
        # top-2 of 3 per module: at most 2 nonzero... per module; averaged over modules, an expert may be absent
    assert any(row[e] == 0 for layer in trace["weights"] for row in layer for e in range(3))  # sparse choices

    routed = httpx.post(
        f"{live['url']}/api/route",
        headers=live["env"].query,
        json={"model": "arrow-mix", "messages": messages, "trace": True},
        timeout=120,
    )
    assert routed.status_code == 200, routed.text
    route = routed.json()
    assert route["router"] == "arrow" and route["extra"]["level"] == "token"
    assert route["trace"]["prompt_tokens"] == len(route["trace"]["tokens"]) == trace["prompt_tokens"]
    assert route["trace"]["weights"][0] == [row for row in trace["weights"][0][: trace["prompt_tokens"]]]

    stream_trace = httpx.post(
        f"{live['url']}/v1/chat/completions",
        headers=live["env"].query,
        json={"model": "arrow-mix", "messages": messages, "stream": True, "moerge_trace": True},
    )
    assert stream_trace.status_code == 400 and stream_trace.json()["error"]["param"] == "moerge_trace"


def test_trace_needs_a_token_router(live: dict[str, Any]) -> None:
    assert _create(live, name="plain", router="direct", experts=["mix-a"]).status_code == 201
    resp = httpx.post(
        f"{live['url']}/api/route",
        headers=live["env"].query,
        json={"model": "plain", "query": "hi", "trace": True},
        timeout=60,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "trace"


def test_trace_respects_the_context_length(live: dict[str, Any]) -> None:
    """A trace runs one forward pass over the whole query: one longer than the model's context (512 tokens on
    the tiny model) is refused before it runs, as a generation would be."""
    assert _create(live, name="arrow-long", router="arrow", experts=list(SLUGS)).status_code == 201
    long_query = " ".join(["word"] * 2000)
    for body, param in (
        ({"query": long_query}, "query"),
        ({"messages": [{"role": "user", "content": long_query}]}, "messages"),
    ):
        resp = httpx.post(
            f"{live['url']}/api/route",
            headers=live["env"].query,
            json={"model": "arrow-long", "trace": True, **body},
            timeout=120,
        )
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and "at most 512" in error["message"]
    short = httpx.post(
        f"{live['url']}/api/route",
        headers=live["env"].query,
        json={"model": "arrow-long", "query": "hi", "trace": True},
        timeout=120,
    )
    assert short.status_code == 200 and short.json()["trace"]["prompt_tokens"] > 0


def _arrow_top1() -> Any:
    return TOKEN_ROUTERS.build("arrow", {"top_k": 1})


async def test_engine_set_sends_mixtures_to_its_torch_engine(tiny_base: Path, tmp_path: Path) -> None:
    adapter = build_tiny_lora(tiny_base, tmp_path / "a", seed=1)
    mixture = TokenMixture("m", "arrow", '{"top_k": 1}', (("id", "a", adapter),), make_router=_arrow_top1)
    main, local = TorchEngine(), TorchEngine()
    engines = EngineSet(main, local)
    try:
        plain = GenRequest(Target("b", tiny_base), Sampling(max_tokens=4), prompt="hi")
        mixed = GenRequest(Target("b", tiny_base, mixture=mixture), Sampling(max_tokens=4), prompt="hi")
        results = await engines.generate([plain, mixed, plain])
        assert all(isinstance(r, GenResult) for r in results), results
        assert [s["name"] for s in await main.status()] == ["b"]
        assert [s["name"] for s in await local.status()] == ["m"]
        assert len(await engines.status()) == 2
        assert "".join([c.text async for c in engines.stream(mixed)]) == results[1].text  # type: ignore[union-attr]
        # a fused request (logit_fusion) also runs on the torch engine, never on the main one
        lora = Target("b", tiny_base, adapter_id="lora-id", adapter_dir=adapter)
        members = (FusedMember("b", Target("b", tiny_base), 0.5), FusedMember("a", lora, 0.5))
        [fused] = await engines.generate(
            [GenRequest(members[0].target, Sampling(max_tokens=4), prompt="hi", fusion=Fusion(members))]
        )
        assert isinstance(fused, GenResult) and fused.extra["fusion"]["members"]
        assert all("lora-id" not in s["adapters"] for s in await main.status())
        assert any("lora-id" in s["adapters"] for s in await local.status())
        assert engines.capabilities.logit_fusion and engines.capabilities.token_mixtures
    finally:
        await engines.close()
    # what the x-moerge-engine header says: the torch engine answers mixtures and fused requests beside vLLM
    beside_vllm = EngineSet(VLLMEngine())  # nothing starts until a request needs a server
    plain = members[0].target
    assert answering_engine(beside_vllm, plain, fused=True) == "torch"
    assert answering_engine(beside_vllm, plain) == "vllm"
    assert answering_engine(TorchEngine(), plain, fused=True) == "torch"


def test_eval_draws_the_trace_heatmap(live: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env: RegistryEnv = live["env"]
    monkeypatch.setenv("MOERGE_URL", live["url"])
    monkeypatch.setenv("MOERGE_API_KEY", env.admin_key)
    assert _create(live, name="arrow-mix", router="arrow", experts=list(SLUGS)).status_code == 201
    assert _create(live, name="plain", router="direct", experts=["mix-a"]).status_code == 201
    result = CliRunner().invoke(
        cli, ["eval", "arrow-mix", "plain", "--task", "arithmetic", "--n", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    heatmap = tmp_path / "trace-arrow-mix.png"
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heatmap.stat().st_size > 5000
    assert not (tmp_path / "trace-plain.png").exists()  # a query-level router has no token trace
    rows = {r["model"]: r for r in json.loads((tmp_path / "eval.json").read_text())["rows"]}
    assert rows["arrow-mix"]["routing_accuracy"] is None  # every adapter is in play: not a routing score


async def test_vllm_refuses_what_only_torch_runs(tiny_base: Path, tmp_path: Path) -> None:
    """Sent to vLLM directly, a mixture or a fused request is refused before any server starts (vLLM would
    answer it with one model alone)."""
    from core.errors import ValidationFailed
    from serving.vllm import VLLMConfig

    adapter = build_tiny_lora(tiny_base, tmp_path / "a", seed=1)
    eng = VLLMEngine(VLLMConfig(log_dir=tmp_path))
    try:
        mixture = TokenMixture("m", "arrow", '{"top_k": 1}', (("id", "a", adapter),), make_router=_arrow_top1)
        mixed = GenRequest(Target("b", tiny_base, mixture=mixture), Sampling(max_tokens=4), prompt="hi")
        plain = Target("b", tiny_base)
        fused = GenRequest(plain, Sampling(max_tokens=4), prompt="hi", fusion=Fusion((FusedMember("b", plain, 1.0),)))
        for request in (mixed, fused):
            [result] = await eng.generate([request])
            assert isinstance(result, ValidationFailed) and "torch engine" in result.message
            with pytest.raises(ValidationFailed):
                await anext(aiter(eng.stream(request)))
        assert await eng.status() == []  # no server was started
    finally:
        await eng.close()


def _attach(live: dict[str, Any], slug: str, rows: list[dict[str, str]]) -> None:
    body = "\n".join(json.dumps(r) for r in rows)
    resp = httpx.post(
        f"{live['url']}/api/experts/{slug}/training-data",
        content=body,
        headers={**live["env"].admin, "content-type": "application/x-ndjson"},
        timeout=60,
    )
    assert resp.status_code in (200, 201), resp.text


def _traced(live: dict[str, Any], model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """/api/route's answer for ``model`` with the per-token trace."""
    body = {"model": model, "messages": messages, "trace": True}
    resp = httpx.post(f"{live['url']}/api/route", headers=live["env"].query, json=body, timeout=120)
    return resp.json()  # type: ignore[no-any-return]


def _finished_job(live: dict[str, Any], job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{live['url']}/api/jobs/{job_id}", headers=live["env"].query, timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job  # type: ignore[no-any-return]
        time.sleep(0.2)


def test_phatgoose_and_glider_compositions(live: dict[str, Any]) -> None:
    """phatgoose needs each expert's training data (a clear 400 naming the expert without it); with it, the gates
    are trained at creation and stored; glider adds the per-query bias from the base's task description."""
    training = {"training": {"steps": 3, "batch_size": 2}}
    resp = _create(live, name="gates", router="phatgoose", router_params=training, experts=list(SLUGS))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "experts[0]", resp.text
    for i, slug in enumerate(SLUGS):
        _attach(live, slug, [{"prompt": f"say {w} {i}", "answer": f"{w}{i}"} for w in ("one", "two", "three")])
    resp = _create(live, name="gates", router="phatgoose", router_params=training, experts=list(SLUGS))
    assert resp.status_code == 201, resp.text
    # training gates is slow: the request queued a `fit` job (the server's worker runs it) instead of waiting
    fitted = _finished_job(live, resp.json()["fit_job"])
    assert fitted["kind"] == "fit" and fitted["status"] == "succeeded", fitted
    assert fitted["result"] == {"composition": "gates", "router": "phatgoose", "experts": len(SLUGS)}
    refit = httpx.post(f"{live['url']}/api/compositions/gates/fit", headers=live["env"].admin, timeout=60)
    assert refit.status_code == 202 and _finished_job(live, refit.json()["id"])["status"] == "succeeded"
    client = live["client"]
    messages = [{"role": "user", "content": "say two 1"}]
    done = client.chat.completions.create(model="gates", messages=messages, max_tokens=6, temperature=0)
    assert done.choices[0].message.content is not None and done.model == "gates"

    scale = 1e4  # overwhelming: the favoured expert must then carry (almost) all weight everywhere
    params = {"local": "phatgoose", "local_params": training, "model": "tiny-base", "max_new_tokens": 4, "scale": scale}
    resp = _create(live, name="glide", router="glider", router_params=params, experts=list(SLUGS))
    assert resp.status_code == 201, resp.text
    routed = _traced(live, "glide", messages)
    extra = routed["extra"]
    assert extra["level"] == "token" and isinstance(extra["task_description"], str)
    bias = extra["bias"]
    assert bias == {s: pytest.approx(scale * routed["scores"][s]) for s in SLUGS}  # scale x cosine
    ranked = sorted(bias.values())
    assert ranked[-1] - ranked[-2] > 1, bias  # distinct descriptions: one expert clearly favoured
    favoured = SLUGS.index(max(bias, key=bias.__getitem__))
    weights = [row[favoured] for layer in routed["trace"]["weights"] for row in layer]
    assert min(weights) > 0.99
    done = client.chat.completions.create(model="glide", messages=messages, max_tokens=6, temperature=0)
    assert done.choices[0].message.content is not None


def test_mixer_composition(live: dict[str, Any]) -> None:
    """mixer: bad params are a 400 naming the field; its router is trained at creation on the composition's own
    examples (the experts need no training data), stored, and the composition answers and traces through the API
    with gates (weights in (0, 1), not summing to 1) as its mixing weights."""
    examples = [{"prompt": f"say {w}", "answer": w} for w in ("one", "two", "three")]
    for params, field in (
        ({}, "router_params.examples"),
        ({"examples": [{"prompt": "say one"}]}, "router_params.examples[0].answer"),
        ({"examples": examples, "init": 2.0}, "router_params.init"),
        ({"task": "nope"}, "router_params.task"),
    ):
        resp = _create(live, name="mix", router="mixer", router_params=params, experts=list(SLUGS))
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["error"]["param"] == field, (params, resp.json())
    params = {"examples": examples, "training": {"steps": 3, "batch_size": 2}}
    resp = _create(live, name="mix", router="mixer", router_params=params, experts=list(SLUGS[:2]))
    assert resp.status_code == 201, resp.text
    messages = [{"role": "user", "content": "say two"}]
    done = live["client"].chat.completions.create(model="mix", messages=messages, max_tokens=6, temperature=0)
    assert done.choices[0].message.content is not None and done.model == "mix"
    routed = _traced(live, "mix", messages)
    assert routed["extra"]["level"] == "token"
    rows = [row for layer in routed["trace"]["weights"] for row in layer]
    assert rows and all(0 < w < 1 for row in rows for w in row)
    assert any(abs(sum(row) - 1) > 1e-3 for row in rows)
