"""The torch engine against plain transformers / PEFT on the tiny seeded models: greedy outputs must be
token-for-token what ``generate`` gives, whether a request runs alone, in a mixed-adapter batch or through
adapter switching."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ValidationFailed
from serving.engine import Engine, GenChunk, GenerationFailed, GenRequest, GenResult, Sampling, Target
from serving.torch_engine import TorchEngine

# On the seeded tiny models, "hello" gives three different greedy answers on base, tiny_lora and lora2.
PROMPTS = ["hello", "Solve 12 + 30", "What is the capital of France?"]
CHAT = [{"role": "user", "content": "Translate to German: good morning"}]
GREEDY = Sampling(max_tokens=16)


@pytest.fixture(scope="module")
def lora2(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_lora

    return build_tiny_lora(tiny_base, tmp_path_factory.mktemp("models") / "tiny-lora2", seed=1, r=8)


@pytest.fixture(scope="module")
def corrupt_lora(tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter_config.json with unreadable weights: fails only after PEFT has injected its layers."""
    dest = tmp_path_factory.mktemp("models") / "corrupt-lora"
    shutil.copytree(tiny_lora, dest)
    (dest / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return dest


@pytest.fixture
async def engine() -> Any:
    eng = TorchEngine()
    yield eng
    await eng.close()


def target(base: Path, adapter: Path | None = None, adapter_id: str | None = None) -> Target:
    if adapter is None:
        return Target(base_id="b", base_dir=base)
    return Target(base_id="b", base_dir=base, adapter_id=adapter_id or adapter.name, adapter_dir=adapter)


def ok(result: GenResult | BaseException) -> GenResult:
    assert isinstance(result, GenResult), result
    return result


def reference(base: Path, adapter: Path | None, *, prompt: str | None = None, max_new: int = 16) -> tuple[str, int]:
    """Plain transformers (or PEFT with one adapter) greedy generate, batch of one: (text, new tokens)."""
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    if prompt is None:
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    text_ids = new[:-1] if new and new[-1] == tok.eos_token_id else new  # the engine drops EOS from text
    return str(tok.decode(text_ids, skip_special_tokens=True)), len(new)


async def test_is_an_engine(engine: TorchEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.name == "torch"


async def test_greedy_base_is_deterministic_and_equals_transformers(engine: TorchEngine, tiny_base: Path) -> None:
    request = GenRequest(target(tiny_base), GREEDY, prompt=PROMPTS[0])
    first, second = await engine.generate([request, request])
    again = ok((await engine.generate([request]))[0])
    text, n_new = reference(tiny_base, None, prompt=PROMPTS[0])
    assert ok(first).text == ok(second).text == again.text == text
    assert text  # a non-trivial comparison
    assert again.completion_tokens == n_new
    assert again.prompt_tokens == len(AutoTokenizer.from_pretrained(tiny_base)(PROMPTS[0])["input_ids"])


async def test_mixed_batch_equals_each_alone_and_peft(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path
) -> None:
    adapters: list[Path | None] = [None, tiny_lora, lora2]
    # Same prompt on every adapter, prompts of different lengths (left padding), and chat requests.
    requests = [GenRequest(target(tiny_base, a), GREEDY, prompt=PROMPTS[0]) for a in adapters]
    requests += [
        GenRequest(target(tiny_base, a), GREEDY, prompt=p)
        for a, p in zip(adapters, [*PROMPTS[1:], PROMPTS[1]], strict=True)
    ]
    requests += [GenRequest(target(tiny_base, a), GREEDY, messages=CHAT) for a in adapters]
    mixed = [ok(r) for r in await engine.generate(requests)]
    assert {r.extra["batch_size"] for r in mixed} == {len(requests)}  # one generate call

    alone = [ok((await engine.generate([req]))[0]) for req in requests]
    assert [r.text for r in mixed] == [r.text for r in alone]
    assert [r.completion_tokens for r in mixed] == [r.completion_tokens for r in alone]

    # The adapters change the output, and each matches PEFT's own single-adapter generate.
    assert len({r.text for r in mixed[:3]}) == 3
    for req, result in zip(requests, mixed, strict=True):
        adapter = req.target.adapter_dir
        assert (result.text, result.completion_tokens) == reference(tiny_base, adapter, prompt=req.prompt)
        assert result.extra["adapter"] == (req.target.adapter_id if adapter else None)


async def test_switching_equals_mixed_batch(engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path) -> None:
    requests = [
        GenRequest(target(tiny_base, a), GREEDY, prompt=p)
        for p in PROMPTS
        for a in (lora2, None, tiny_lora)  # interleaved: switching must regroup and still answer in order
    ]
    mixed = [ok(r) for r in await engine.generate(requests)]
    switched = [ok(r) for r in await engine.generate_switching(requests)]
    assert [r.text for r in switched] == [r.text for r in mixed]
    assert {r.extra["batch_size"] for r in switched} == {len(PROMPTS)}  # one batch per adapter group
    # Switching left an adapter active; mixed batches must not be affected by that.
    again = [ok(r) for r in await engine.generate(requests)]
    assert [r.text for r in again] == [r.text for r in mixed]


async def test_stop_strings_and_max_tokens(engine: TorchEngine, tiny_base: Path, tiny_lora: Path) -> None:
    t = target(tiny_base, tiny_lora)
    full = ok((await engine.generate([GenRequest(t, Sampling(max_tokens=24), prompt=PROMPTS[1])]))[0])
    assert full.finish_reason == "length" and full.completion_tokens == 24
    stop = full.text[4:7]
    expected = full.text[: full.text.find(stop)]
    short, stopped, never = await engine.generate(
        [
            GenRequest(t, Sampling(max_tokens=5), prompt=PROMPTS[1]),
            GenRequest(t, Sampling(max_tokens=24, stop=("no such text", stop)), prompt=PROMPTS[1]),
            GenRequest(t, Sampling(max_tokens=24, stop=("no such text",)), prompt=PROMPTS[1]),
        ]
    )
    assert ok(short).finish_reason == "length" and ok(short).completion_tokens == 5
    assert full.text.startswith(ok(short).text)
    assert ok(stopped).finish_reason == "stop" and ok(stopped).text == expected
    assert ok(stopped).completion_tokens < 24  # generation ended at the stop string
    assert ok(never).text == full.text and ok(never).finish_reason == "length"


async def test_min_tokens_and_ignore_eos(engine: TorchEngine, tiny_base: Path, tmp_path: Path) -> None:
    """vLLM's fixed-length extensions: make the base's first greedy token its end-of-sequence, then EOS ends
    the answer at once unless ``ignore_eos`` or ``min_tokens`` hold it off."""
    first = ok((await engine.generate([GenRequest(target(tiny_base), Sampling(max_tokens=1), prompt=PROMPTS[1])]))[0])
    first_id = AutoTokenizer.from_pretrained(tiny_base)(first.text, add_special_tokens=False)["input_ids"][0]
    eos_base = tmp_path / "eos-base"
    shutil.copytree(tiny_base, eos_base)
    config_path = eos_base / "generation_config.json"
    gen_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**gen_config, "eos_token_id": first_id}))
    t = Target(base_id="eos", base_dir=eos_base)
    stopped, fixed, at_least = await engine.generate(
        [
            GenRequest(t, Sampling(max_tokens=12), prompt=PROMPTS[1]),
            GenRequest(t, Sampling(max_tokens=12, ignore_eos=True), prompt=PROMPTS[1]),
            GenRequest(t, Sampling(max_tokens=12, min_tokens=5), prompt=PROMPTS[1]),
        ]
    )
    assert ok(stopped).finish_reason == "stop" and ok(stopped).completion_tokens == 1
    assert ok(fixed).finish_reason == "length" and ok(fixed).completion_tokens == 12
    assert ok(at_least).completion_tokens >= 5 and ok(at_least).text


async def test_sampling_is_seeded_per_request(engine: TorchEngine, tiny_base: Path, tiny_lora: Path) -> None:
    t = target(tiny_base, tiny_lora)

    def req(seed: int) -> GenRequest:
        return GenRequest(t, Sampling(max_tokens=16, temperature=1.5, top_p=0.95, seed=seed), prompt=PROMPTS[2])

    alone = ok((await engine.generate([req(1)]))[0])
    in_batch = await engine.generate([GenRequest(target(tiny_base), GREEDY, prompt=PROMPTS[0]), req(2), req(1)])
    assert ok(in_batch[2]).text == alone.text  # the same seed gives the same text whatever shares the batch
    assert ok(in_batch[1]).text != alone.text
    greedy = ok((await engine.generate([GenRequest(target(tiny_base), GREEDY, prompt=PROMPTS[0])]))[0])
    assert ok(in_batch[0]).text == greedy.text  # a sampled neighbour leaves a greedy row untouched


async def test_extreme_sampling_values_answer(engine: TorchEngine, tiny_base: Path) -> None:
    """Values schemathesis found failing the whole batch: a temperature or top_p far below float32's range is
    greedy decoding; a seed past 64 bits is taken modulo 2^64."""
    t = target(tiny_base)
    greedy = ok((await engine.generate([GenRequest(t, Sampling(max_tokens=8), prompt=PROMPTS[2])]))[0])
    cases = [
        Sampling(max_tokens=8, temperature=9.68e-138),
        Sampling(max_tokens=8, temperature=1.0, top_p=2.3e-181),
        Sampling(max_tokens=8, temperature=1.0, top_p=1e-3),  # sampled: keeps only the likeliest token
    ]
    outs = await engine.generate([GenRequest(t, sampling, prompt=PROMPTS[2]) for sampling in cases])
    assert [ok(o).text for o in outs] == [greedy.text] * 3
    seeded = [Sampling(max_tokens=8, temperature=1.0, seed=seed) for seed in (2**70 + 5, 5)]
    big, small = await engine.generate([GenRequest(t, sampling, prompt=PROMPTS[2]) for sampling in seeded])
    assert ok(big).text == ok(small).text  # 2^70 + 5 is 5 modulo 2^64


async def test_stream_concatenates_to_generate_text(engine: TorchEngine, tiny_base: Path, tiny_lora: Path) -> None:
    cases: list[tuple[Sampling, dict[str, Any]]] = [
        (Sampling(max_tokens=20), {"prompt": PROMPTS[1]}),
        (Sampling(max_tokens=20), {"messages": CHAT}),
        (Sampling(max_tokens=20, stop=("ci",)), {"prompt": PROMPTS[0]}),
    ]
    for sampling, kwargs in cases:
        request = GenRequest(target(tiny_base, tiny_lora), sampling, **kwargs)
        result = ok((await engine.generate([request]))[0])
        assert result.finish_reason == ("stop" if sampling.stop else "length")
        chunks: list[GenChunk] = [c async for c in engine.stream(request)]
        assert "".join(c.text for c in chunks) == result.text
        assert len(chunks) > 2  # really streamed
        assert all(c.finish_reason is None for c in chunks[:-1])
        last = chunks[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
        )


async def test_stream_holds_back_a_possible_stop_string(engine: TorchEngine, tiny_base: Path, tiny_lora: Path) -> None:
    t = target(tiny_base, tiny_lora)
    full = ok((await engine.generate([GenRequest(t, Sampling(max_tokens=20), prompt=PROMPTS[0])]))[0])
    # A stop string that is the whole start of the answer: nothing may be streamed before it is complete.
    request = GenRequest(t, Sampling(max_tokens=20, stop=(full.text[:13],)), prompt=PROMPTS[0])
    chunks = [c async for c in engine.stream(request)]
    assert [c.text for c in chunks] == [""] and chunks[0].finish_reason == "stop"
    assert ok((await engine.generate([request]))[0]).text == ""


async def test_stream_shares_a_batch_and_can_be_abandoned(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path
) -> None:
    request = GenRequest(target(tiny_base, tiny_lora), Sampling(max_tokens=64), prompt=PROMPTS[0])
    stream = engine.stream(request)
    first = await stream.__anext__()
    assert first.text
    await stream.aclose()  # the client went away mid-stream: its row stops, the base is free again
    result = ok((await asyncio.wait_for(engine.generate([request]), timeout=60))[0])
    assert result.text.startswith(first.text)


async def test_concurrent_calls_share_one_batch(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, lora2: Path
) -> None:
    requests = [GenRequest(target(tiny_base, a), GREEDY, prompt=PROMPTS[0]) for a in (None, tiny_lora, lora2)]
    results = await asyncio.gather(*(engine.generate([r]) for r in requests))
    assert [ok(r[0]).extra["batch_size"] for r in results] == [3, 3, 3]
    alone = [ok((await engine.generate([r]))[0]).text for r in requests]
    assert [ok(r[0]).text for r in results] == alone


async def test_max_batch_size_splits(tiny_base: Path, tiny_lora: Path) -> None:
    eng = TorchEngine(max_batch_size=2)
    try:
        requests = [GenRequest(target(tiny_base, a), GREEDY, prompt=p) for p in PROMPTS for a in (None, tiny_lora)]
        results = [ok(r) for r in await eng.generate(requests)]
        assert max(r.extra["batch_size"] for r in results) == 2
        alone = [ok((await eng.generate([r]))[0]).text for r in requests]
        assert [r.text for r in results] == alone
    finally:
        await eng.close()


async def test_bad_adapter_fails_only_its_request(
    engine: TorchEngine, tiny_base: Path, tiny_lora: Path, corrupt_lora: Path, tmp_path: Path
) -> None:
    # The corrupt adapter is the base's first: PEFT has already injected layers when its weights fail.
    requests = [
        GenRequest(target(tiny_base), GREEDY, prompt=PROMPTS[0]),
        GenRequest(target(tiny_base, corrupt_lora), GREEDY, prompt=PROMPTS[0]),
        GenRequest(target(tiny_base, tiny_lora), GREEDY, prompt=PROMPTS[0]),
        GenRequest(target(tiny_base, tmp_path / "missing"), GREEDY, prompt=PROMPTS[0]),
        GenRequest(target(tiny_base), GREEDY),  # neither prompt nor messages
    ]
    base, corrupt, good, missing, empty = await engine.generate(requests)
    assert isinstance(corrupt, GenerationFailed) and "corrupt-lora" in corrupt.message
    assert isinstance(missing, GenerationFailed) and "missing" in corrupt.message + missing.message
    assert isinstance(empty, ValidationFailed)
    assert ok(base).text == reference(tiny_base, None, prompt=PROMPTS[0])[0]
    assert ok(good).text == reference(tiny_base, tiny_lora, prompt=PROMPTS[0])[0]
    status = await engine.status()
    assert [s["adapters"] for s in status] == [["tiny-lora"]]


async def test_bad_base_fails_its_requests(engine: TorchEngine, tmp_path: Path) -> None:
    (result,) = await engine.generate([GenRequest(target(tmp_path / "nowhere"), GREEDY, prompt="hi")])
    assert isinstance(result, GenerationFailed)
    with pytest.raises(GenerationFailed):
        async for _ in engine.stream(GenRequest(target(tmp_path / "nowhere"), GREEDY, prompt="hi")):
            pass


async def test_status_load_and_close(engine: TorchEngine, tiny_base: Path, tiny_lora: Path) -> None:
    assert await engine.status() == []
    await engine.load(target(tiny_base, tiny_lora))
    (status,) = await engine.status()
    assert status["state"] == "loaded" and status["adapters"] == ["tiny-lora"] and status["engine"] == "torch"
    await engine.close()
    assert await engine.status() == []
    # Usable again after close: the base loads lazily once more.
    assert ok((await engine.generate([GenRequest(target(tiny_base), GREEDY, prompt="hi")]))[0]).completion_tokens
