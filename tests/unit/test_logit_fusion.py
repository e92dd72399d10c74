"""Logit fusion: the pure mixture (weights by hand), and fused decoding in the torch engine on the tiny seeded
models against a step-by-step reference decode, alone, in shared batches, sampled and streamed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from aggregators import AGGREGATORS
from composition.compose import compose, compose_stream
from composition.plan import Member, Plan, Query
from core.errors import Unprocessable, ValidationFailed
from serving import logit_fusion
from serving.engine import (
    Capabilities,
    FusedMember,
    Fusion,
    GenChunk,
    GenerationFailed,
    GenRequest,
    GenResult,
    Sampling,
    Target,
)
from serving.logit_fusion import mix_distributions, step_weights
from serving.torch_engine import TorchEngine

# the `confident` fixture adapts the tied lm_head, which PEFT warns about every time it loads it
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")

PROMPT = "hello"
GREEDY = Sampling(max_tokens=12)


def spy_on_hooks(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """Record the rows of every fused batch the engine decodes (``logit_fusion.hooks`` still does the work)."""
    seen: list[list[Any]] = []
    real_hooks = logit_fusion.hooks

    def spy(rows: Any, eos_ids: frozenset[int]) -> Any:
        seen.append(list(rows))
        return real_hooks(rows, eos_ids)

    monkeypatch.setattr(logit_fusion, "hooks", spy)
    return seen


@pytest.fixture(scope="module")
def lora2(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_lora

    return build_tiny_lora(tiny_base, tmp_path_factory.mktemp("models") / "tiny-lora2", seed=1, r=8)


@pytest.fixture(scope="module")
def confident(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on lm_head scaled up: its next-token distributions are much sharper (lower entropy) than the
    other tiny models' near-uniform ones, so entropy weighting visibly favours it."""
    from tests.fixtures.tiny import build_tiny_lora

    dest = tmp_path_factory.mktemp("models") / "confident"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT also warns that it saves the (tied) embedding layer
        return build_tiny_lora(tiny_base, dest, target_modules=("lm_head",), alpha=16, seed=3)


@pytest.fixture
async def engine() -> Any:
    eng = TorchEngine()
    yield eng
    await eng.close()


def target(base: Path, adapter: Path | None = None, base_id: str = "b") -> Target:
    if adapter is None:
        return Target(base_id=base_id, base_dir=base)
    return Target(base_id=base_id, base_dir=base, adapter_id=adapter.name, adapter_dir=adapter)


def member(base: Path, adapter: Path | None, weight: float = 1.0) -> FusedMember:
    return FusedMember(adapter.name if adapter is not None else "base", target(base, adapter), weight)


def fused(
    members: list[FusedMember],
    sampling: Sampling = GREEDY,
    *,
    mode: str = "entropy",
    tau: float = 1.0,
    prompt: str = PROMPT,
) -> GenRequest:
    fusion = Fusion(tuple(members), mode=mode, tau=tau)  # type: ignore[arg-type]
    return GenRequest(members[0].target, sampling, prompt=prompt, fusion=fusion)


async def settled(rows: list[Any]) -> None:
    """The result is delivered as soon as the leader row ends, while the batch's worker thread may still
    be stepping the other rows of that step: wait for every row to end."""
    for _ in range(500):
        if all(row.reason is not None for row in rows):
            return
        await asyncio.sleep(0.01)
    raise AssertionError([row.reason for row in rows])


def ok(result: GenResult | BaseException) -> GenResult:
    assert isinstance(result, GenResult), result
    return result


# --- the pure mixture ---------------------------------------------------------------------------------


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def test_static_mix_is_the_prior_weighted_average_of_probabilities() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    probs, weights = mix_distributions(logits, [2.0, 1.0, 1.0], "static")
    assert weights.tolist() == pytest.approx([0.5, 0.25, 0.25])
    by_hand = [
        sum(w * _softmax(row)[v] for w, row in zip([0.5, 0.25, 0.25], logits.tolist(), strict=True)) for v in range(4)
    ]
    assert probs.tolist() == pytest.approx(by_hand, abs=1e-6)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)


def test_entropy_weights_by_hand_and_favour_the_confident_member() -> None:
    confident = [8.0, 0.0, 0.0, 0.0, 0.0]
    unsure = [0.1, 0.0, 0.1, 0.0, 0.1]
    logits = torch.tensor([confident, unsure])
    tau = 0.5
    probs, weights = mix_distributions(logits, [0.5, 0.5], "entropy", tau)
    entropies = [-sum(p * math.log(p) for p in _softmax(row)) for row in (confident, unsure)]
    raw = [0.5 * math.exp(-h / tau) for h in entropies]
    expected = [r / sum(raw) for r in raw]
    assert weights.tolist() == pytest.approx(expected, abs=1e-6)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert weights[0] > weights[1]  # the confident member gets more than its even prior
    by_hand = [sum(w * _softmax(r)[v] for w, r in zip(expected, (confident, unsure), strict=True)) for v in range(5)]
    assert probs.tolist() == pytest.approx(by_hand, abs=1e-6)
    # a large tau tends to the prior; a small one to the most confident member; a zero prior stays zero
    assert step_weights(logits, [0.5, 0.5], "entropy", 1e6).tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    assert step_weights(logits, [0.5, 0.5], "entropy", 1e-3).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert step_weights(logits, [0.0, 1.0], "entropy", 1e-3).tolist() == [0.0, 1.0]


def test_all_weight_on_one_member_is_exactly_its_distribution() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for mode in ("static", "entropy"):
        probs, weights = mix_distributions(logits, [0.0, 1.0, 0.0], mode, temperature=0.7)
        assert weights.tolist() == [0.0, 1.0, 0.0]
        assert torch.equal(probs, torch.softmax(logits[1] / 0.7, dim=-1))
    with pytest.raises(ValueError):
        step_weights(logits, [1.0, 1.0, 1.0], "median")


def test_batches_never_split_a_fused_group(tiny_base: Path) -> None:
    class R:
        def __init__(self, group: object = None) -> None:
            self.fusion = group

    g1, g2 = object(), object()
    rows = [R(), R(g1), R(g1), R(g1), R(), R(g2), R(g2), R()]
    out = list(logit_fusion.batches(rows, 2))  # type: ignore[type-var]
    assert [len(b) for b in out] == [1, 3, 1, 2, 1]  # a group of three runs alone even over the limit
    assert [r for b in out for r in b] == rows


# --- fused decoding in the engine ----------------------------------------------------------------------


def reference_fused(
    base: Path, adapters: list[Path | None], prior: list[float], mode: str, tau: float, max_new: int
) -> tuple[str, int]:
    """Fusion by hand: every step, each member's logits from its own full forward (no cache, no batch),
    mixed by ``mix_distributions``, greedy; (text without EOS, new tokens)."""
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names: dict[Path, str] = {}
    for i, path in enumerate(a for a in adapters if a is not None):
        names[path] = f"a{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name="a0").eval()
        else:
            model.load_adapter(str(path), adapter_name=f"a{i}")
    ids = tok(PROMPT)["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new):
            logits = []
            for adapter in adapters:
                if adapter is None:
                    ctx: Any = model.disable_adapter() if names else contextlib.nullcontext()
                else:
                    model.set_adapter(names[adapter])
                    ctx = contextlib.nullcontext()
                with ctx:
                    logits.append(model(input_ids=torch.tensor([ids + out])).logits[0, -1])
            probs, _ = mix_distributions(torch.stack(logits), prior, mode, tau)
            out.append(int(torch.argmax(probs)))
            if out[-1] == tok.eos_token_id:
                break
    text_ids = out[:-1] if out and out[-1] == tok.eos_token_id else out
    return str(tok.decode(text_ids, skip_special_tokens=True)), len(out)


async def test_one_member_equals_its_own_greedy_output(engine: TorchEngine, tiny_base: Path, tiny_lora: Path) -> None:
    for adapter in (None, tiny_lora):
        alone = ok((await engine.generate([GenRequest(target(tiny_base, adapter), GREEDY, prompt=PROMPT)]))[0])
        one = ok((await engine.generate([fused([member(tiny_base, adapter)])]))[0])
        assert (one.text, one.completion_tokens, one.finish_reason) == (
            alone.text,
            alone.completion_tokens,
            alone.finish_reason,
        )
        assert alone.text


async def test_all_weight_on_one_member_equals_that_member(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path
) -> None:
    alone = ok((await engine.generate([GenRequest(target(tiny_base, lora2), GREEDY, prompt=PROMPT)]))[0])
    for mode in ("static", "entropy"):
        members = [member(tiny_base, tiny_lora, 0.0), member(tiny_base, lora2, 1.0), member(tiny_base, None, 0.0)]
        result = ok((await engine.generate([fused(members, mode=mode)]))[0])
        assert (result.text, result.completion_tokens) == (alone.text, alone.completion_tokens)
        assert result.extra["fusion"]["mean_weights"] == {"tiny-lora": 0.0, "tiny-lora2": 1.0, "base": 0.0}


@pytest.mark.parametrize(("mode", "tau"), [("entropy", 1.0), ("entropy", 0.3), ("static", 1.0)])
async def test_two_members_decode_together_like_the_reference(
    engine: TorchEngine,
    tiny_base: Path,
    tiny_lora: Path,
    confident: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    tau: float,
) -> None:
    seen = spy_on_hooks(monkeypatch)
    prior = [0.7, 0.3]
    members = [member(tiny_base, tiny_lora, prior[0]), member(tiny_base, confident, prior[1])]
    result = ok((await engine.generate([fused(members, mode=mode, tau=tau)]))[0])

    assert len(seen) == 1 and len(seen[0]) == 2  # one generate call, one row per member
    leader, other = seen[0]
    await settled(seen[0])
    assert leader.out_ids == other.out_ids and len(leader.out_ids) == result.completion_tokens  # the same tokens
    assert result.extra["batch_size"] == 2
    assert (result.text, result.completion_tokens) == reference_fused(
        tiny_base, [tiny_lora, confident], prior, mode, tau, GREEDY.max_tokens
    )

    summary = result.extra["fusion"]
    assert summary["mode"] == mode and summary["members"] == ["tiny-lora", "confident"]
    assert summary["steps"] == result.completion_tokens
    assert sum(summary["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    if mode == "static":
        assert list(summary["mean_weights"].values()) == pytest.approx(prior, abs=1e-6)
    else:  # the sharper member gains weight over its prior
        assert summary["mean_weights"]["confident"] > prior[1] + 0.02


async def test_modes_give_different_answers(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, confident: Path
) -> None:
    """Each member alone, the static mix and the entropy mix are four different answers here: the mixture
    is a real third distribution, and the per-step reweighting changes what it decodes."""
    requests = [GenRequest(target(tiny_base, a), GREEDY, prompt=PROMPT) for a in (tiny_lora, confident)]
    members = [member(tiny_base, tiny_lora, 0.7), member(tiny_base, confident, 0.3)]
    requests += [fused(members, mode="static"), fused(members, mode="entropy", tau=0.3)]
    texts = [ok(r).text for r in await engine.generate(requests)]
    assert len(set(texts)) == 4, texts
    even = [member(tiny_base, tiny_lora, 0.5), member(tiny_base, confident, 0.5)]
    weights = ok((await engine.generate([fused(even, mode="entropy", tau=0.3)]))[0]).extra["fusion"]["mean_weights"]
    assert weights["confident"] > 0.55  # the sharper member gains over an even prior


async def test_fused_rows_share_a_batch_without_changing_ordinary_rows(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path
) -> None:
    ordinary = [
        GenRequest(target(tiny_base, lora2), GREEDY, prompt="Solve 12 + 30"),
        GenRequest(target(tiny_base), Sampling(max_tokens=4), prompt="What is the capital of France?"),
    ]
    group = fused([member(tiny_base, None, 0.4), member(tiny_base, tiny_lora, 0.6)])
    shared = [ok(r) for r in await engine.generate([ordinary[0], group, ordinary[1]])]
    assert {r.extra["batch_size"] for r in shared} == {4}  # two ordinary rows and the group's two rows
    alone = [ok((await engine.generate([r]))[0]) for r in (*ordinary, group)]
    assert [r.text for r in shared] == [alone[0].text, alone[2].text, alone[1].text]
    assert [r.completion_tokens for r in shared] == [
        alone[0].completion_tokens,
        alone[2].completion_tokens,
        alone[1].completion_tokens,
    ]
    assert "fusion" not in shared[0].extra and "fusion" in shared[1].extra


async def test_a_group_larger_than_max_batch_size_runs_whole(tiny_base: Path, tiny_lora: Path, lora2: Path) -> None:
    eng = TorchEngine(max_batch_size=2)
    try:
        group = fused([member(tiny_base, None), member(tiny_base, tiny_lora), member(tiny_base, lora2)])
        plain = GenRequest(target(tiny_base), GREEDY, prompt=PROMPT)
        result, alone = (ok(r) for r in await eng.generate([group, plain]))
        assert result.extra["batch_size"] == 3 and alone.extra["batch_size"] == 1
    finally:
        await eng.close()


async def test_sampling_is_seeded_and_one_member_samples_as_alone(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path
) -> None:
    def sampling(seed: int) -> Sampling:
        return Sampling(max_tokens=16, temperature=1.3, top_p=0.95, seed=seed)

    members = [member(tiny_base, None), member(tiny_base, tiny_lora)]
    first = ok((await engine.generate([fused(members, sampling(7))]))[0])
    neighbour = GenRequest(target(tiny_base, tiny_lora), sampling(3), prompt="Solve 12 + 30")
    again, _, other = await engine.generate([fused(members, sampling(7)), neighbour, fused(members, sampling(8))])
    assert ok(again).text == first.text  # the same seed, whatever shares the batch
    assert ok(other).text != first.text
    # with a single member the mixture is that member's own distribution: the same sample as alone
    solo = ok((await engine.generate([GenRequest(target(tiny_base, tiny_lora), sampling(5), prompt=PROMPT)]))[0])
    one = ok((await engine.generate([fused([member(tiny_base, tiny_lora)], sampling(5))]))[0])
    assert one.text == solo.text


async def test_stream_equals_generate(engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path) -> None:
    members = [member(tiny_base, tiny_lora, 0.5), member(tiny_base, lora2, 0.5)]
    for sampling in (Sampling(max_tokens=20), Sampling(max_tokens=20, temperature=1.0, seed=4)):
        request = fused(members, sampling)
        result = ok((await engine.generate([request]))[0])
        chunks: list[GenChunk] = [c async for c in engine.stream(request)]
        assert "".join(c.text for c in chunks) == result.text
        assert len(chunks) > 2
        last = chunks[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
        )


async def test_stop_strings_and_max_tokens_end_the_whole_group(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = [member(tiny_base, tiny_lora), member(tiny_base, lora2)]
    full = ok((await engine.generate([fused(members, Sampling(max_tokens=24, ignore_eos=True))]))[0])
    assert full.finish_reason == "length" and full.completion_tokens == 24
    stop = full.text[5:8]
    seen = spy_on_hooks(monkeypatch)
    stopped = ok((await engine.generate([fused(members, Sampling(max_tokens=24, ignore_eos=True, stop=(stop,)))]))[0])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.find(stop)]
    leader, other = seen[0]
    await settled(seen[0])
    assert other.reason == "fused" and len(other.out_ids) == len(leader.out_ids) < 24


async def test_refusals_name_the_member(engine: TorchEngine, tiny_base: Path, tiny_lora: Path, tmp_path: Path) -> None:
    ia3 = tmp_path / "ia3-adapter"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": "x"}))
    other_base = FusedMember("elsewhere", target(tiny_base, base_id="another-base"))
    cases = [
        fused([member(tiny_base, tiny_lora), other_base]),
        fused([member(tiny_base, None), FusedMember("ia3-expert", target(tiny_base, ia3))]),
        fused([member(tiny_base, None), FusedMember("missing", target(tiny_base, tmp_path / "missing"))]),
        fused([member(tiny_base, None), member(tiny_base, None)]),
        fused([member(tiny_base, None, -1.0)]),
    ]
    plain = GenRequest(target(tiny_base), GREEDY, prompt=PROMPT)
    *refused, answered = await engine.generate([*cases, plain])
    assert ok(answered).text
    different_base, not_lora, missing, twice, negative = refused
    assert isinstance(different_base, ValidationFailed) and different_base.param == "experts"
    assert "'elsewhere'" in different_base.message and "share one base" in different_base.message
    assert isinstance(not_lora, ValidationFailed) and not_lora.param == "experts"
    assert "'ia3-expert'" in not_lora.message and "IA3" in not_lora.message
    assert isinstance(missing, GenerationFailed) and "'missing'" in missing.message
    assert isinstance(twice, ValidationFailed) and twice.param == "experts"
    assert isinstance(negative, ValidationFailed) and "'base'" in negative.message
    with pytest.raises(ValidationFailed, match="elsewhere"):
        async for _ in engine.stream(cases[0]):
            pass
    (switched,) = await engine.generate_switching([fused([member(tiny_base, None), member(tiny_base, tiny_lora)])])
    assert isinstance(switched, ValidationFailed)


# --- the aggregator -------------------------------------------------------------------------------------


def test_aggregator_config_is_typed_and_validated() -> None:
    agg: Any = AGGREGATORS.build("logit_fusion", {})
    assert agg.fuses_logits and not agg.uses_model and agg.config.mode == "entropy"
    assert AGGREGATORS.build("logit_fusion", {"mode": "static", "tau": 0.5}).config.tau == 0.5  # type: ignore[attr-defined]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tau": 0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"mode": "median"}, "mode"),
        ({"x": 1}, "x"),
    ]
    for params, field in cases:
        with pytest.raises(ValidationFailed) as refused:
            AGGREGATORS.build("logit_fusion", params)
        assert refused.value.param == f"aggregator_params.{field}"


def _resolved(members: list[FusedMember], params: dict[str, Any]) -> Plan:
    return Plan(
        "fused",
        members[0].target,
        router="embedding",
        members=tuple(Member(m.name, m.weight, m.target) for m in members),
        aggregator=AGGREGATORS.build("logit_fusion", params),
        aggregator_name="logit_fusion",
    )


async def test_compose_sends_one_fused_request(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path
) -> None:
    members = [member(tiny_base, tiny_lora, 0.6), member(tiny_base, lora2, 0.4)]
    direct = ok((await engine.generate([fused(members, mode="static")]))[0])

    query = Query("fused", GREEDY, prompt=PROMPT)
    done = await compose(engine, _resolved(members, {"mode": "static"}), query)
    assert done.aggregation.text == direct.text and done.completion_tokens == direct.completion_tokens
    assert done.prompt_tokens == direct.prompt_tokens  # the prompt once, not once per member
    assert done.aggregation.extra["fusion"]["mean_weights"] == {"tiny-lora": 0.6, "tiny-lora2": 0.4}
    assert done.experts == ("tiny-lora", "tiny-lora2") and done.weights == (0.6, 0.4)
    assert [a.slug for a in done.members] == ["tiny-lora", "tiny-lora2"]

    stream = await compose_stream(engine, _resolved(members, {"mode": "static"}), query)
    assert "".join([c.text async for c in stream.chunks()]) == direct.text


async def test_compose_refuses_an_engine_without_fusion(tiny_base: Path, tiny_lora: Path) -> None:
    class NoFusion:
        name = "vllm"
        capabilities = Capabilities()

        async def generate(self, requests: list[GenRequest]) -> list[GenResult | BaseException]:
            raise AssertionError("must not be called")

    members = [member(tiny_base, None), member(tiny_base, tiny_lora)]
    vllm_like: Any = NoFusion()
    for run in (compose, compose_stream):
        with pytest.raises(Unprocessable) as refused:
            await run(vllm_like, _resolved(members, {}), Query("fused", GREEDY, prompt=PROMPT))
        assert refused.value.code == "fusion_unsupported" and "torch engine" in refused.value.message


def test_composition_members_must_be_one_base_and_its_loras() -> None:
    from composition.service import CompositionSpec, _check_fusable
    from registry.models import Expert

    base_a, base_b = uuid.uuid4(), uuid.uuid4()
    base = Expert(id=base_a, slug="base-a", kind="base")
    lora = Expert(id=uuid.uuid4(), slug="lora-a", kind="adapter", base_id=base_a, peft_type="LORA")
    merged_lora = Expert(id=uuid.uuid4(), slug="merged-a", kind="merged", base_id=base_a, peft_type="LORA")
    finetune = Expert(id=uuid.uuid4(), slug="ft-a", kind="finetune", base_id=base_a)
    dora = Expert(id=uuid.uuid4(), slug="dora-a", kind="adapter", base_id=base_a, peft_type="LORA", use_dora=True)
    elsewhere = Expert(id=uuid.uuid4(), slug="lora-b", kind="adapter", base_id=base_b, peft_type="LORA")

    def spec(k: int = 2) -> CompositionSpec:
        return CompositionSpec(name="f", router="embedding", k=k, aggregator="logit_fusion")

    _check_fusable(spec(3), [base, lora, merged_lora])  # fine
    for members, k, param, named in [
        ([lora, elsewhere], 2, "experts[1]", "lora-b"),
        ([lora, finetune], 2, "experts[1]", "ft-a"),
        ([dora, lora], 2, "experts[0]", "dora-a"),
        ([base, lora], 1, "k", None),
    ]:
        with pytest.raises(ValidationFailed) as refused:
            _check_fusable(spec(k), members)
        assert refused.value.param == param
        if named:
            assert f"'{named}'" in refused.value.message
