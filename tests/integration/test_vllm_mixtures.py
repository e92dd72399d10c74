"""Token-level mixtures served inside vLLM as one adapter slot (serving/vllm_mixtures.py, serving/mixture/slot.py),
batched with plain-adapter and base requests, against the torch engine's mixture layer (the reference)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from routers.token import TOKEN_ROUTERS
from serving.engine import GenRequest, GenResult, Sampling, Target, TokenMixture
from serving.mixture import load_lora_adapter
from serving.torch_engine import TorchEngine
from serving.vllm import VLLMConfig, VLLMEngine

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

BASE_ID = "tiny-mix"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
FIXED = Sampling(max_tokens=24, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class Models:
    base: Path
    adapters: tuple[Path, ...]

    def target(self, adapter: int | None = None) -> Target:
        if adapter is None:
            return Target(BASE_ID, self.base)
        return Target(BASE_ID, self.base, adapter_id=f"plain-{adapter}", adapter_dir=self.adapters[adapter])

    def mixture(self, router: str, params: dict[str, Any], members: tuple[int, ...] = (0, 1, 2)) -> Target:
        built = TOKEN_ROUTERS.build(router, params)
        states: tuple[dict[str, Any], ...] = ()
        if router in ("phatgoose", "glider"):  # gates as stored states: seeded, one per module of each adapter
            gen = torch.Generator().manual_seed(7)
            states = tuple(
                {
                    m: torch.randn(w.A.shape[1], generator=gen)
                    for m, w in load_lora_adapter(self.adapters[i]).modules.items()
                }
                for i in members
            )
        slot = built.slot_params()
        mixture = TokenMixture(
            composition=f"{router}-{'-'.join(map(str, members))}",
            router=router,
            router_params=json.dumps(params, sort_keys=True),
            adapters=tuple((f"id-{i}", f"expert-{i}", self.adapters[i]) for i in members),
            states=states,
            make_router=lambda: TOKEN_ROUTERS.build(router, params),
            slot_params="" if slot is None else json.dumps(slot, sort_keys=True),
        )
        return Target(BASE_ID, self.base, served_name=mixture.composition, mixture=mixture)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from tests.fixtures.vllm_models import build_vllm_tiny_llama, build_vllm_tiny_lora

    root = tmp_path_factory.mktemp("mix-models")
    base = build_vllm_tiny_llama(root / "base")
    ranks = (8, 4, 8)  # different ranks in one slot
    return Models(
        base, tuple(build_vllm_tiny_lora(base, root / f"a{i}", seed=30 + i, r=r) for i, r in enumerate(ranks))
    )


def _config(tmp: Path, port_start: int, **kw: Any) -> VLLMConfig:
    return VLLMConfig(
        port_start=port_start,
        max_model_len=512,
        max_loras=4,
        max_lora_rank=32,  # a mixture of ranks 8 + 4 + 8 with 3 router rows is rank 23
        kv_cache_gib=1,
        log_dir=tmp,
        health_interval_s=1,
        startup_timeout_s=600,
        **kw,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMEngine]:
    eng = VLLMEngine(_config(tmp_path_factory.mktemp("mix-logs"), 18700))
    yield eng
    await eng.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference() -> AsyncIterator[TorchEngine]:
    eng = TorchEngine()
    yield eng
    await eng.close()


def _ok(results: list[GenResult | BaseException]) -> list[str]:
    for r in results:
        if isinstance(r, BaseException):
            raise AssertionError(f"request failed: {r!r}")
    return [r.text for r in results]  # type: ignore[union-attr]


async def test_mixtures_run_in_vllm_batched_with_plain_adapters_and_the_base(
    engine: VLLMEngine, reference: TorchEngine, models: Models
) -> None:
    """Arrow and PHATGOOSE mixtures in one vLLM batch with two plain adapters and the base: each mixture gives the
    torch mixture layer's greedy text, and the plain and base requests give what they give without mixtures."""
    arrow = models.mixture("arrow", {"top_k": 2, "temperature": 1.0})
    phatgoose = models.mixture("phatgoose", {"top_k": 2})
    mixed = [
        GenRequest(arrow, FIXED, prompt=PROMPT),
        GenRequest(models.target(0), FIXED, prompt=PROMPT),
        GenRequest(phatgoose, FIXED, messages=MESSAGES),
        GenRequest(models.target(), FIXED, prompt=PROMPT),
        GenRequest(arrow, FIXED, messages=MESSAGES),
        GenRequest(models.target(2), FIXED, messages=MESSAGES),
    ]
    got = _ok(await engine.generate(mixed))
    alone = _ok(await engine.generate([mixed[i] for i in (1, 3, 5)]))
    want = _ok(await reference.generate([mixed[i] for i in (0, 2, 4)]))
    assert [got[i] for i in (0, 2, 4)] == want
    assert [got[i] for i in (1, 3, 5)] == alone
    assert len(set(got)) == len(got)  # every model answers differently: a mixture is none of its members
    [server] = await engine.status()
    assert any(name.startswith("mixture-") for name in server["adapters"])
    streamed = "".join([c.text async for c in engine.stream(mixed[0])])
    assert streamed == got[0]


async def test_glider_bias_travels_per_request(engine: VLLMEngine, reference: TorchEngine, models: Models) -> None:
    """Two requests on one GLIDER slot with different per-query biases, in one batch: each gets the reference's
    answer for its own bias (the bias reaches the op per token through vllm_xargs)."""
    glider = models.mixture("glider", {"local": "phatgoose", "local_params": {"top_k": 1}})
    requests = [
        GenRequest(glider, FIXED, prompt=PROMPT, router_bias=bias) for bias in ((6.0, -6.0, 0.0), (-6.0, 0.0, 6.0))
    ]
    got = _ok(await engine.generate(requests))
    assert got == _ok(await reference.generate(requests))
    assert got[0] != got[1]


async def test_one_member_mixture_equals_its_adapter(engine: VLLMEngine, models: Models) -> None:
    one = models.mixture("arrow", {"top_k": 2}, members=(1,))
    got = _ok(
        await engine.generate(
            [GenRequest(one, FIXED, prompt=PROMPT), GenRequest(models.target(1), FIXED, prompt=PROMPT)]
        )
    )
    assert got[0] == got[1]


async def test_eager_server_gives_the_compiled_servers_answers(
    engine: VLLMEngine, models: Models, tmp_path: Path
) -> None:
    arrow = models.mixture("arrow", {"top_k": 2, "temperature": 1.0})
    requests = [GenRequest(arrow, FIXED, prompt=PROMPT), GenRequest(models.target(0), FIXED, prompt=PROMPT)]
    eager = VLLMEngine(_config(tmp_path, 18780, compile=False))
    try:
        want = _ok(await eager.generate(requests))
    finally:
        await eager.close()
    assert _ok(await engine.generate(requests)) == want


async def test_weighted_mixture_applies_each_requests_weights(
    engine: VLLMEngine, reference: TorchEngine, models: Models
) -> None:
    """A weighted mixture (one slot for every weight vector): two requests with different weights in one batch get
    the torch engine's answers for theirs; weights (0, 1, 0) give the middle adapter alone."""
    from composition.mixtures import weighted_mixture

    mixture = weighted_mixture("weighted", tuple((f"id-{i}", f"expert-{i}", models.adapters[i]) for i in range(3)))
    target = Target(BASE_ID, models.base, served_name="weighted", mixture=mixture)
    requests = [GenRequest(target, FIXED, prompt=PROMPT, mixture_weights=w) for w in ((0.6, 0.3, 0.1), (0.0, 1.0, 0.0))]
    got = _ok(await engine.generate([*requests, GenRequest(models.target(1), FIXED, prompt=PROMPT)]))
    assert got[:2] == _ok(await reference.generate(requests))
    assert got[1] == got[2] and got[0] != got[1]


async def test_a_cached_prefix_never_carries_another_requests_vector(
    engine: VLLMEngine, reference: TorchEngine, models: Models
) -> None:
    """vLLM caches a prompt's KV blocks per adapter; a mixture's KV also depends on the request's vector (GLIDER's
    bias, the weights), so one request after another with the same long prompt and another vector must not reuse
    the first one's blocks: each gets the reference's answer for its own vector."""
    glider = models.mixture("glider", {"local": "phatgoose", "local_params": {"top_k": 1}})
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)  # several full KV blocks
    answers = []
    for bias in ((6.0, -6.0, 0.0), (-6.0, 0.0, 6.0)):
        request = GenRequest(glider, FIXED, prompt=long_prompt, router_bias=bias)
        answers.append((_ok(await engine.generate([request]))[0], _ok(await reference.generate([request]))[0]))
    assert [got for got, _ in answers] == [want for _, want in answers]
    assert answers[0][0] != answers[1][0]
