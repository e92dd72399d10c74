"""Do mixtures served inside vLLM (one adapter slot run by moerge's op) answer as the torch reference does?

On eval-split prompts of the demo's tasks (10 per task: 60), for each named composition (token-level routers and a
`weighted` one, resolved through the registry as the API resolves them, GLIDER's per-query bias and the weighted
composition's per-query weights included):

- first generated token: vLLM's top-20 logprobs (``return_tokens_as_token_ids``) against the torch reference's for
  the same token ids (the torch mixture layer, ``serving/mixture``, on transformers; for a plain adapter, PEFT): the
  gap of a prompt is the largest absolute difference; a mixture passes when its mean gap is at most twice the mean
  gap measured the same way for a plain adapter (the demo's ``units-lora``);
- greedy answers (the task's answer length) of vLLM and of the torch engine: identical on at least 95% of prompts;
- a one-member mixture (arrow, top-1, ``units-lora`` alone) gives the plain adapter's greedy answers in vLLM;
- a mixed batch (every mixture's requests + the plain adapter + the base, all at once) gives each request the
  answer it gets alone.

Needs the demo registered and its compositions created (``STEPS=parity scripts/eval_demo.sh`` does both), and
the trained experts: not part of CI. Writes ``evals/results/demo/vllm-parity.{md,json}``.

    MOERGE_HOME=... .venv/bin/python -m evals.vllm_parity arrow phatgoose glider mixer-six pair-weighted
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from composition.composer import Composer, router_context  # noqa: E402
from composition.factory import create_engine  # noqa: E402
from composition.plan import Plan, Query  # noqa: E402
from core.settings import Settings  # noqa: E402
from evals.sources import install_example_sources  # noqa: E402
from evals.tasks import TASKS, chat_messages  # noqa: E402
from registry.db import make_engine, make_sessionmaker  # noqa: E402
from registry.store import ArtifactStore  # noqa: E402
from routers.query.embedder import LazyEmbedder  # noqa: E402
from serving.dispatch import EngineSet  # noqa: E402
from serving.engine import GenRequest, GenResult, Sampling, Target, TokenMixture  # noqa: E402
from serving.vllm import VLLMEngine  # noqa: E402
from serving.vllm_openai import mixture_fields  # noqa: E402

TOP = 20
PLAIN = "units-lora"
OUT = ROOT / "evals" / "results" / "demo"


def prompts(per_task: int) -> list[tuple[str, str, int]]:
    """(task, prompt, answer length) for ``per_task`` eval-split examples of each demo task."""
    out = []
    for task in TASKS:
        out += [(task.name, ex.prompt, task.max_new_tokens) for ex in task.examples("eval", per_task)]
    return out


class Reference:
    """The torch side's first-token logprobs: the mixture layer (or PEFT for a plain adapter) on transformers."""

    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.base_dir = base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self._models: dict[str, Any] = {}

    def ids(self, prompt: str) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True)
        return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]

    def model(self, target: Target) -> Any:
        key = target.key
        if key not in self._models:
            self._models.clear()  # one model at a time (540 MB each in float32)
            from transformers import AutoModelForCausalLM

            from serving.mixture import apply_mixture, load_lora_adapter

            model: Any = AutoModelForCausalLM.from_pretrained(str(self.base_dir), dtype=torch.float32)
            if target.mixture is not None:
                mixture = target.mixture
                adapters = [load_lora_adapter(folder, slug) for _, slug, folder in mixture.adapters]
                states = [{k: torch.as_tensor(v) for k, v in s.items()} for s in mixture.states] or None
                layers = apply_mixture(model, adapters, mixture.make_router(), states)
                model.moerge_layers = layers
            elif target.adapter_dir is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(target.adapter_dir))
            model.eval()
            self._models[key] = model
        return self._models[key]

    @torch.no_grad()
    def logprobs(self, target: Target, ids: list[int], vector: tuple[float, ...] | None) -> torch.Tensor:
        model = self.model(target)
        layers = getattr(model, "moerge_layers", {})
        for layer in layers.values():  # GLIDER's bias, or a weighted mixture's weights, for this one sequence
            layer.row_bias = None if vector is None else torch.tensor([vector], dtype=torch.float32)
        try:
            logits = model(torch.tensor([ids])).logits[0, -1]
        finally:
            for layer in layers.values():
                layer.row_bias = None
        return torch.log_softmax(logits.float(), dim=-1)


async def vllm_logprobs(url: str, model: str, ids: list[int], vector: tuple[float, ...] | None) -> dict[int, float]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": TOP,
        "return_tokens_as_token_ids": True,
    }
    if vector is not None:
        body.update(mixture_fields(vector))
    async with httpx.AsyncClient(timeout=600) as http:
        resp = await http.post(f"{url}/v1/completions", json=body)
    resp.raise_for_status()
    top = resp.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    return {int(token.removeprefix("token_id:")): float(lp) for token, lp in top.items()}


def _vector(plan: Plan) -> tuple[float, ...] | None:
    return plan.mixture_weights if plan.mixture_weights is not None else plan.router_bias


def _text(out: GenResult | BaseException) -> str:
    if isinstance(out, BaseException):
        raise out
    return out.text.strip()  # the torch engine drops a leading space vLLM keeps (a known difference)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.from_env()
    db = make_engine(settings.database_url)
    sessionmaker = make_sessionmaker(db)
    store = ArtifactStore(settings.store_dir)
    engines = await create_engine(settings, sessionmaker)
    assert isinstance(engines, EngineSet), "run with MOERGE_ENGINE=vllm (the default)"
    vllm, torch_engine = engines.main, engines.torch
    assert isinstance(vllm, VLLMEngine)
    embedder = LazyEmbedder(settings.embedding_model, settings.embedding_backend, settings.embedding_cache_mb)
    composer = Composer(engines, store, router_context(engines, sessionmaker, store, embedder))
    cases = prompts(args.per_task)
    report: dict[str, Any] = {"prompts": len(cases), "top": TOP, "models": {}}
    try:
        async with sessionmaker() as session:
            plans = {
                name: [
                    await composer.plan(session, Query(name, Sampling(), messages=chat_messages(p)))
                    for _, p, _ in cases
                ]
                for name in [PLAIN, *args.compositions]
            }
            base_plan = await composer.plan(session, Query(args.base, Sampling(), messages=chat_messages("hi")))
        one = _one_member(plans[PLAIN][0].target)
        reference = Reference(plans[PLAIN][0].target.base_dir)
        sampling = [Sampling(max_tokens=n, temperature=0.0) for _, _, n in cases]

        async def greedy(engine: Any, name: str, target_of: Any = None) -> list[str]:
            requests = [
                GenRequest(
                    target_of(plan) if target_of else plan.target,
                    sampling[i],
                    messages=chat_messages(cases[i][1]),
                    router_bias=plan.router_bias,
                    mixture_weights=plan.mixture_weights,
                )
                for i, plan in enumerate(plans[name])
            ]
            return [_text(r) for r in await engine.generate(requests)]

        for name in [PLAIN, *args.compositions]:
            started = time.perf_counter()
            first = plans[name][0]
            if first.target.mixture is not None:
                slot = await vllm.mixture_target(first.target)
                assert slot is not None, f"{name}: vLLM cannot run this mixture here"
            else:
                slot = first.target
            vllm_text = await greedy(vllm, name)  # loads the slot (or adapter) into the server
            url = await vllm.ensure_server(slot)
            gaps = []
            for (_, prompt, _), plan in zip(cases, plans[name], strict=True):
                ids = reference.ids(prompt)
                got = await vllm_logprobs(url, slot.adapter_id or "", ids, _vector(plan))
                want = reference.logprobs(plan.target, ids, _vector(plan))
                gaps.append(max(abs(lp - float(want[token])) for token, lp in got.items()))
            torch_text = await greedy(torch_engine, name)
            same = sum(a == b for a, b in zip(vllm_text, torch_text, strict=True))
            report["models"][name] = {
                "mean_gap": statistics.mean(gaps),
                "max_gap": max(gaps),
                "identical": same / len(cases),
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(name, report["models"][name], flush=True)

        plain_gap = report["models"][PLAIN]["mean_gap"]
        for name in args.compositions:
            row = report["models"][name]
            row["gap_ratio"] = row["mean_gap"] / plain_gap if plain_gap else float("inf")
            row["passes"] = row["mean_gap"] <= 2 * plain_gap and row["identical"] >= 0.95

        # one-member mixture vs the plain adapter, both in vLLM
        plain_text = await greedy(vllm, PLAIN)
        one_text = await greedy(vllm, PLAIN, lambda plan: one)
        report["one_member_identical"] = sum(a == b for a, b in zip(plain_text, one_text, strict=True)) / len(cases)

        # a mixed batch: one prompt of each task for every model, and for the base, all at once
        picks = list(range(0, len(cases), args.per_task))
        batch: list[GenRequest] = []
        for name in [PLAIN, *args.compositions]:
            for i in picks:
                plan = plans[name][i]
                batch.append(
                    GenRequest(
                        plan.target,
                        sampling[i],
                        messages=chat_messages(cases[i][1]),
                        router_bias=plan.router_bias,
                        mixture_weights=plan.mixture_weights,
                    )
                )
        batch += [GenRequest(base_plan.target, sampling[i], messages=chat_messages(cases[i][1])) for i in picks]
        alone = [_text((await vllm.generate([request]))[0]) for request in batch]
        together = [_text(r) for r in await vllm.generate(batch)]
        report["mixed_batch_identical"] = sum(a == b for a, b in zip(alone, together, strict=True)) / len(batch)
        report["mixed_batch_requests"] = len(batch)
    finally:
        await engines.close()
        await db.dispose()
    return report


def _one_member(plain: Target) -> Target:
    """``units-lora`` alone as an arrow top-1 mixture of one member."""
    from routers.token import TOKEN_ROUTERS

    router = TOKEN_ROUTERS.build("arrow", {"top_k": 1})
    assert plain.adapter_id is not None and plain.adapter_dir is not None
    mixture = TokenMixture(
        composition="one-member",
        router="arrow",
        router_params='{"top_k": 1}',
        adapters=((plain.adapter_id, PLAIN, plain.adapter_dir),),
        make_router=lambda: TOKEN_ROUTERS.build("arrow", {"top_k": 1}),
        slot_params=json.dumps(router.slot_params(), sort_keys=True),
    )
    return replace(plain, adapter_id=None, adapter_dir=None, served_name="one-member", mixture=mixture)


def markdown(report: dict[str, Any]) -> str:
    plain = report["models"][PLAIN]
    lines = [
        f"### Mixtures in vLLM against the torch reference ({report['prompts']} eval-split prompts, top-{TOP} "
        "logprobs of the first token)",
        "",
        "| model | mean gap | max gap | gap / plain adapter's | greedy identical | passes |",
        "|---|---:|---:|---:|---:|---|",
        f"| {PLAIN} (plain adapter: vLLM vs PEFT) | {plain['mean_gap']:.2e} | {plain['max_gap']:.2e} | 1 | "
        f"{plain['identical']:.0%} | |",
    ]
    for name, row in report["models"].items():
        if name == PLAIN:
            continue
        lines.append(
            f"| {name} | {row['mean_gap']:.2e} | {row['max_gap']:.2e} | {row['gap_ratio']:.2f} | "
            f"{row['identical']:.0%} | {'yes' if row['passes'] else '**no**'} |"
        )
    lines += [
        "",
        "gap = the largest |logprob(vLLM) - logprob(torch)| over vLLM's top-20 first tokens, per prompt; a mixture "
        "passes with a mean gap at most twice the plain adapter's and identical greedy answers on at least 95% of "
        "prompts.",
        f"One-member mixture (arrow top-1 of {PLAIN}) vs {PLAIN} in vLLM: greedy identical on "
        f"{report['one_member_identical']:.0%} of prompts. Mixed batch ({report['mixed_batch_requests']} requests: "
        "every model above and the base at once) vs each request alone: identical on "
        f"{report['mixed_batch_identical']:.0%}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compositions", nargs="+", help="compositions to check (token-level or weighted)")
    parser.add_argument("--per-task", type=int, default=10, help="eval-split prompts per task (6 tasks)")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    install_example_sources()  # a `mixer` composition names a demo task for its router's examples, as the app does
    report = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm-parity.json").write_text(json.dumps(report, indent=1))
    (args.out / "vllm-parity.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
