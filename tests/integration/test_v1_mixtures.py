"""Token-level and weighted compositions through /v1 with the vLLM engine: with moerge's ops a mixture is one
adapter slot in the base's vLLM server (x-moerge-engine: vllm); as stock vLLM runs on a GPU machine
(MOERGE_VLLM_LORA_OPS=vllm) the same compositions are answered by the torch engine (x-moerge-engine: torch)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from registry import db
from registry.schemas import ExpertSpec
from tests.fixtures.live import registered, serve, vllm_settings
from tests.fixtures.vllm_models import build_vllm_tiny_llama, build_vllm_tiny_lora

pytestmark = pytest.mark.vllm

OPS = {"moerge-ops": ({}, "vllm"), "stock-vllm": ({"vllm_lora_ops": "vllm", "vllm_compile": False}, "torch")}
CHAT = [{"role": "user", "content": "Convert 3 km to metres"}]


@pytest.fixture(scope="module", params=list(OPS))
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("v1-mix")
    base = build_vllm_tiny_llama(root / "base")
    loras = [build_vllm_tiny_lora(base, root / f"lora-{i}", seed=40 + i) for i in range(3)]
    settings = vllm_settings(root, **OPS[request.param][0])
    adapters = [ExpertSpec(slug=f"lora-{i}", base="tiny", description=f"skill number {i}") for i in range(3)]
    key, admin = registered(settings, [(base, ExpertSpec(slug="tiny")), *zip(loras, adapters, strict=True)])
    with serve(settings) as url:
        headers = {"authorization": f"Bearer {admin}"}
        for body in (
            {
                "name": "mix",
                "router": "arrow",
                "router_params": {"top_k": 2},
                "experts": ["lora-0", "lora-1", "lora-2"],
            },
            {
                "name": "blend",
                "router": "embedding",
                "router_params": {"threshold": -1},
                "experts": ["lora-0", "lora-1", "lora-2"],
                "k": 2,
                "aggregator": "weighted",
                "aggregator_params": {"temperature": 0.5, "always_on": {"lora-2": 0.25}},
            },
        ):
            created = httpx.post(f"{url}/api/compositions", json=body, headers=headers, timeout=120)
            assert created.status_code == 201, created.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        yield {"url": url, "client": client, "engine": OPS[request.param][1], "admin": admin, "settings": settings}


def test_token_level_composition_answers_from_the_engine_that_can_mix(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(model="mix", messages=CHAT, max_tokens=16, temperature=0)
    text = raw.parse().choices[0].message.content
    assert text and raw.headers["x-moerge-engine"] == live["engine"]
    streamed = client.chat.completions.create(model="mix", messages=CHAT, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    if live["engine"] == "vllm":  # the mixture is one adapter of the base's vLLM server
        engines = httpx.get(f"{live['url']}/api/engines", headers={"authorization": f"Bearer {live['admin']}"}).json()
        assert any(name.startswith("mixture-") for s in engines["servers"] for name in s["adapters"])


def test_weighted_composition_applies_the_chosen_adapters_in_one_generation(live: dict[str, Any]) -> None:
    """k = 2 chosen by the router, weighted by a softmax of their scores, plus the always-on member: one answer."""
    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(model="blend", messages=CHAT, max_tokens=16, temperature=0)
    reply = raw.parse()
    assert reply.choices[0].message.content and raw.headers["x-moerge-engine"] == live["engine"]
    assert raw.headers["x-moerge-aggregator"] == "weighted"
    experts = raw.headers["x-moerge-experts"].split(",")
    weights = [float(w) for w in raw.headers["x-moerge-weights"].split(",")]
    assert "lora-2" in experts and 2 <= len(experts) <= 3
    assert abs(sum(weights) - 1.25) < 1e-4  # a softmax over the two chosen, plus the always-on member's 0.25


def test_a_requests_own_merge_of_adapters_merged_adapters(live: dict[str, Any]) -> None:
    """LoRAX's merged_adapters: adapters of the base applied together with the request's weights (linear); weights
    (1, 0) give the first adapter's own answer; what cannot be merged so is refused naming the field."""
    client: openai.OpenAI = live["client"]

    def merged(ids: list[str], weights: list[float], model: str = "tiny", **extra: Any) -> Any:
        body = {"merged_adapters": {"ids": ids, "weights": weights, **extra}}
        return client.completions.with_raw_response.create(
            model=model, prompt="The quick brown fox", max_tokens=12, temperature=0, extra_body=body
        )

    alone = client.completions.create(model="lora-0", prompt="The quick brown fox", max_tokens=12, temperature=0)
    raw = merged(["lora-1", "lora-0"], [0.0, 1.0])
    # (stock vLLM: the torch engine answers the merge, and it drops the leading space vLLM keeps: a known difference)
    assert raw.parse().choices[0].text.lstrip() == alone.choices[0].text.lstrip()
    assert raw.headers["x-moerge-engine"] == live["engine"]
    assert raw.headers["x-moerge-experts"].split(",") and set(raw.headers["x-moerge-experts"].split(",")) == {
        "lora-0",
        "lora-1",
    }
    blend = merged(["lora-0", "lora-1"], [0.5, 0.5]).parse().choices[0].text
    assert blend and blend != alone.choices[0].text

    for args, param in (
        ((["lora-0", "lora-1"], [1.0], "tiny"), "merged_adapters.weights"),
        ((["lora-0"], [1.0], "lora-1"), "model"),
        ((["tiny"], [1.0]), "merged_adapters.ids[0]"),
        ((["lora-0"], [1e9]), "merged_adapters.weights[0]"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            merged(*args)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        merged(["lora-0", "lora-1"], [0.5, 0.5], merge_strategy="ties")
    assert refused.value.body["param"] == "merged_adapters.merge_strategy"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        merged(["no-such-adapter"], [1.0])
    assert missing.value.body["param"] == "merged_adapters.ids[0]"  # type: ignore[index]


def test_a_server_started_now_is_sized_for_the_registered_mixtures(live: dict[str, Any]) -> None:
    """--max-lora-rank at start covers every mixture slot: `mix` (arrow over three rank-8 adapters) is 3 x 8 plus a
    router row each = 27; `blend` (weighted) 24, no router rows."""
    from composition.factory import mixture_lora_rank

    async def rank() -> int:
        engine = db.make_engine(live["settings"].database_url)
        try:
            return await mixture_lora_rank(db.make_sessionmaker(engine))
        finally:
            await engine.dispose()

    assert asyncio.run(rank()) == 27
