"""A token-level mixture served by the torch engine: rows of a mixture batch decode with per-token routes, a
one-adapter top-1 mixture answers exactly as that adapter through PEFT, the router bias changes the routes,
streams equal plain generations, and the trace reports every layer's choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import ValidationFailed
from routers.token import TOKEN_ROUTERS, load_lora_adapter
from serving.engine import GenRequest, GenResult, Sampling, Target, TokenMixture
from serving.torch_engine import TorchEngine
from tests.fixtures.tiny import build_tiny_lora

TARGETS = ("q_proj", "v_proj", "down_proj")
GREEDY = Sampling(max_tokens=8)
PROMPTS = ["the cat sat on", "numbers 1 2 3", "hello there friend"]


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("mix-engine")
    # Large alpha: the adapters change the output visibly, so a wrong route changes the text.
    return [
        build_tiny_lora(tiny_base, root / f"e{i}", r=4, alpha=64, target_modules=TARGETS, seed=40 + i) for i in range(3)
    ]


def mixture(adapters: list[Path], **params: Any) -> TokenMixture:
    return TokenMixture(
        composition="mix",
        router="arrow",
        router_params=json.dumps(params, sort_keys=True),
        adapters=tuple((f"id{i}", f"e{i}", path) for i, path in enumerate(adapters)),
        make_router=lambda: TOKEN_ROUTERS.build("arrow", params),
    )


def ok(result: GenResult | BaseException) -> GenResult:
    assert isinstance(result, GenResult), result
    return result


@pytest.fixture
async def engine() -> Any:
    eng = TorchEngine()
    yield eng
    await eng.close()


async def test_one_adapter_mixture_answers_as_the_adapter(
    engine: TorchEngine, tiny_base: Path, adapters: list[Path]
) -> None:
    mix = Target("base", tiny_base, mixture=mixture(adapters[:1], top_k=1))
    plain = Target("base", tiny_base, adapter_id="id0", adapter_dir=adapters[0])
    mixed = await engine.generate([GenRequest(mix, GREEDY, prompt=p) for p in PROMPTS])
    single = await engine.generate([GenRequest(plain, GREEDY, prompt=p) for p in PROMPTS])
    assert [ok(r).text for r in mixed] == [ok(r).text for r in single]
    base = await engine.generate([GenRequest(Target("base", tiny_base), GREEDY, prompt=p) for p in PROMPTS])
    assert [ok(r).text for r in base] != [ok(r).text for r in single]  # the adapter does act


async def test_batched_rows_equal_rows_alone_and_stream(
    engine: TorchEngine, tiny_base: Path, adapters: list[Path]
) -> None:
    target = Target("base", tiny_base, mixture=mixture(adapters, top_k=2))
    together = [ok(r).text for r in await engine.generate([GenRequest(target, GREEDY, prompt=p) for p in PROMPTS])]
    alone = [ok((await engine.generate([GenRequest(target, GREEDY, prompt=p)]))[0]).text for p in PROMPTS]
    assert together == alone
    streamed = "".join([c.text async for c in engine.stream(GenRequest(target, GREEDY, prompt=PROMPTS[0]))])
    assert streamed == together[0]
    [entry] = [s for s in await engine.status() if s["name"] == "mix"]
    assert entry["adapters"] == ["e0", "e1", "e2"] and entry["router"] == "arrow"


async def test_trace_reports_routes_and_bias_moves_them(
    engine: TorchEngine, tiny_base: Path, adapters: list[Path]
) -> None:
    target = Target("base", tiny_base, mixture=mixture(adapters, top_k=1))
    request = GenRequest(target, GREEDY, prompt=PROMPTS[0])
    trace = await engine.trace(request, completion=" and")
    n_tokens = len(trace.tokens)
    assert trace.prompt_tokens < n_tokens and trace.experts == ["e0", "e1", "e2"] and trace.top_k == 1
    assert trace.layers == ["0", "1"]  # the tiny model's two decoder layers
    for layer in trace.weights:
        assert len(layer) == n_tokens
        for row in layer:
            assert sum(row) == pytest.approx(1.0, abs=1e-3)
    # A large bias for e2 makes it every token's top-1 in every layer.
    biased = await engine.trace(GenRequest(target, GREEDY, prompt=PROMPTS[0], router_bias=(0.0, 0.0, 1e6)), " and")
    assert all(row[2] == pytest.approx(1.0) for layer in biased.weights for row in layer)
    texts = await engine.generate(
        [
            GenRequest(target, GREEDY, prompt=PROMPTS[0]),
            GenRequest(target, GREEDY, prompt=PROMPTS[0], router_bias=(0, 0, 1e6)),
        ]
    )
    only_e2 = Target("base", tiny_base, adapter_id="id2", adapter_dir=adapters[2])
    [alone] = await engine.generate([GenRequest(only_e2, GREEDY, prompt=PROMPTS[0])])
    assert ok(texts[1]).text == ok(alone).text  # top-1 always e2 == the e2 adapter alone, in a mixed batch
    with pytest.raises(ValidationFailed):
        await engine.trace(GenRequest(Target("base", tiny_base), GREEDY, prompt="x"))


async def test_stored_states_are_used(engine: TorchEngine, tiny_base: Path, adapters: list[Path]) -> None:
    """States handed in (router artifacts) are used as given: zeroed prototypes but e1's make e1 the choice."""
    router = TOKEN_ROUTERS.build("arrow", {"top_k": 1})
    states = [router.fit_adapter(load_lora_adapter(p)) for p in adapters]
    forced = [{k: torch.zeros_like(v) for k, v in s.items()} for s in states]
    forced[1] = states[1]
    mix = mixture(adapters, top_k=1)
    target = Target(
        "base",
        tiny_base,
        mixture=TokenMixture(
            mix.composition, mix.router, mix.router_params, mix.adapters, tuple(forced), make_router=mix.make_router
        ),
    )
    trace = await engine.trace(GenRequest(target, GREEDY, prompt=PROMPTS[1]))
    assert all(row[1] == pytest.approx(1.0) for layer in trace.weights for row in layer)
