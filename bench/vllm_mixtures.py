"""Benchmark: token-level and weighted LoRA mixtures served INSIDE vLLM (issue 23), against a plain adapter in the
same vLLM server and against the torch engine's mixture layer (the path mixtures took before).

The model is SmolLM2-135M-Instruct (float32); the mixture's members are the six demo experts when they are trained
and cached, else six seeded random rank-8 LoRAs (``--stand-ins`` forces those); the plain adapter is the demo's
units expert (``units-lora``), or the first stand-in. Every figure comes from moerge's own engines: ``VLLMEngine``
(a managed ``vllm serve`` process; a mixture is written once as one adapter slot, ``serving/vllm_mixtures.py``)
and ``TorchEngine`` (in this process). Greedy chat requests; their prompts take turns: with the demo experts, eval-split
prompts of the six demo tasks (what a composition of them is asked), with stand-ins ``serving_multi_lora.PROMPTS``.

1. Throughput, N = 16 concurrent requests (``--concurrency``): N clients, each sending ``--requests-per-client``
   = 4 requests one after another (the next as soon as its last is answered, so N are in flight until the clients
   run out), natural length and fixed length (exactly ``--max-tokens`` = 32 tokens, ``ignore_eos``): completion
   tokens / wall time of (a) an arrow top-2 mixture of the six experts in vLLM, (b) the plain adapter in vLLM,
   (c) the same mixture on the torch engine. Natural length: the mixture's answers end at EOS (at most
   ``--max-tokens``); the plain adapter then writes answers of the very same lengths (each prompt's mixture answer
   length, ``ignore_eos``), as vLLM's serving benchmark replays a dataset's output lengths: models that answer at
   different lengths (the demo's arrow mixture answers in ~3 tokens, ``units-lora`` in ~7) would otherwise compare
   their answers' lengths, not their serving costs. The plain adapter's own answers are timed too, for reference.
   Target: (a) >= 0.8x (b). Also at 64
   concurrent clients (``--wide``), and beside plain-adapter traffic (N/2 mixture + N/2 plain clients at once;
   each group's tokens / the time until its last answer). With one wave of N requests instead, a natural-length
   figure is mostly the longest answer's length: a path whose other answers end sooner looks slower.
2. Decode cost in vLLM at batch 1 and N: ms per decode step of the arrow mixture vs the plain adapter, as
   (time of a ``--step-tokens`` = 64-token fixed-length generation - time of a 1-token one) / 63, so the prefill
   cancels; the two models interleaved, median of ``--step-rounds`` rounds. Target: mixture <= 1.5x plain.
3. One batch of N/2 mixture + N/2 plain requests (fixed length) against the two run apart, one after the other:
   the mixed batch's wall time vs their sum (target: no slower) and vs the longer of the two.
4. The plain adapter (N concurrent, fixed length) on the server sized for mixtures (``--max-lora-rank 64``) vs a
   server started with ``--max-lora-rank 8``. Target: at most 10% slower. The rank-8 server starts after the
   rank-64 one is closed (one vLLM server at a time on this machine), so the two are not interleaved.
5. A weighted mixture of the six (each request its own weights: 0.73 and 0.27 on two neighbouring members, 0 on the
   rest), N concurrent, fixed length, in vLLM: tokens/s.

Every path is warmed up (adapters loaded, slots written, the mixture fitted, each batch shape run once) before
anything is timed; the paths take turns within every round and each figure is the median of ``--rounds`` rounds.
Writes bench/results/vllm_mixtures.json and the section "LoRA mixtures inside vLLM (issue 23)" of bench/RESULTS.md
(not with ``--no-write``).

    .venv/bin/python bench/vllm_mixtures.py [--rounds 3] [--max-tokens 32] [--skip-torch] [--stand-ins]
    .venv/bin/python bench/vllm_mixtures.py --quick --stand-ins --no-write   # a smoke run: a few minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from bench.serving_multi_lora import PROMPTS, demo_adapters, free_port, make_adapters  # noqa: E402
from serving.engine import Engine, GenRequest, GenResult, Sampling, Target, TokenMixture  # noqa: E402
from serving.vllm import VLLMConfig, VLLMEngine  # noqa: E402

SECTION = "LoRA mixtures inside vLLM (issue 23)"
BASE_ID = "smollm2-135m-instruct"
ARROW_PARAMS = {"temperature": 1.0, "top_k": 2}
MEMBERS = 6
PAIR_WEIGHTS = (1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1)))  # softmax of (1, 0): 0.73, 0.27
MIXTURE_RANK, PLAIN_RANK = 64, 8  # --max-lora-rank of the server sized for mixtures, and of a plain one
PROMPTS_PER_TASK = 8  # demo experts: the requests' prompts are this many eval-split prompts of each demo task
OWN_ANSWERS = "vllm plain adapter, own answers"  # natural length: the plain adapter's own (EOS) answers, for reference


def load_text() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def say(text: str) -> None:
    print(text, flush=True)


# --- models and requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    base_dir: Path
    adapters: tuple[Path, ...]
    slugs: tuple[str, ...]
    plain: int  # index of the plain adapter among ``adapters``
    source: str
    prompts: tuple[str, ...]  # the chat requests' prompts, in turn
    prompt_source: str

    @property
    def plain_slug(self) -> str:
        return self.slugs[self.plain]

    def plain_target(self) -> Target:
        return Target(
            BASE_ID,
            self.base_dir,
            adapter_id=self.plain_slug,
            adapter_dir=self.adapters[self.plain],
            max_lora_rank=PLAIN_RANK,
            served_name=self.plain_slug,
        )

    def members(self) -> tuple[tuple[str, str, Path], ...]:
        return tuple((f"id-{slug}", slug, folder) for slug, folder in zip(self.slugs, self.adapters, strict=True))

    def arrow_target(self) -> Target:
        from routers.token import TOKEN_ROUTERS

        params = dict(ARROW_PARAMS)
        slot = TOKEN_ROUTERS.build("arrow", params).slot_params()
        mixture = TokenMixture(
            composition="arrow-top2-of-6",
            router="arrow",
            router_params=json.dumps(params, sort_keys=True),
            adapters=self.members(),
            states=(),  # the engines fit the arrow prototypes from the adapters' weights
            make_router=lambda: TOKEN_ROUTERS.build("arrow", params),
            slot_params="" if slot is None else json.dumps(slot, sort_keys=True),
        )
        return Target(BASE_ID, self.base_dir, served_name=mixture.composition, mixture=mixture)

    def weighted_target(self) -> Target:
        from composition.mixtures import weighted_mixture

        mixture = weighted_mixture("weighted-of-6", self.members())
        return Target(BASE_ID, self.base_dir, served_name=mixture.composition, mixture=mixture)


def find_models(stand_ins: bool, work: Path) -> Models:
    from registry.convert import cached_smollm2

    base_dir = cached_smollm2()
    demo = None if stand_ins else demo_adapters(MEMBERS)
    if demo is not None:
        tasks = [folder.name.rpartition("-")[0] for folder in demo]  # "<task>-<recipe digest>"
        slugs = tuple(f"{task.replace('_', '-')}-lora" for task in tasks)
        plain = tasks.index("units") if "units" in tasks else 0
        return Models(base_dir, tuple(demo), slugs, plain, "the six demo experts", *task_prompts(tasks))
    start = time.perf_counter()
    folders = make_adapters(base_dir, work / "adapters", MEMBERS)
    say(f"made {MEMBERS} random rank-8 stand-in adapters in {time.perf_counter() - start:.0f} s")
    slugs = tuple(f"stand-in-{i}" for i in range(MEMBERS))
    generic = "four generic prompts (`serving_multi_lora.PROMPTS`)"
    return Models(
        base_dir, tuple(folders), slugs, 0, "six seeded random rank-8 LoRAs (stand-ins)", tuple(PROMPTS), generic
    )


def task_prompts(tasks: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """The demo tasks' eval-split prompts (what a composition of the demo experts is asked), the tasks taking turns."""
    from evals.tasks import TASKS

    per_task = [[e.prompt for e in TASKS.get(task).examples("eval", PROMPTS_PER_TASK)] for task in tasks]
    prompts = tuple(prompt for turn in zip(*per_task, strict=True) for prompt in turn)
    return prompts, f"{len(prompts)} eval-split prompts of the six demo tasks ({PROMPTS_PER_TASK} each, taking turns)"


def chat_requests(
    target: Target,
    n: int,
    sampling: Sampling,
    prompts: Sequence[str],
    *,
    weighted: bool = False,
    offset: int = 0,
    lengths: Mapping[str, int] | None = None,
) -> list[GenRequest]:
    """``n`` chat requests on ``target``, the ``prompts`` cycling; a weighted mixture's requests each bring weights
    on two neighbouring members (which two turns with the request). With ``lengths`` (tokens per prompt) each request
    writes exactly its prompt's number of tokens instead of following ``sampling``'s length."""
    out = []
    for i in range(n):
        prompt = prompts[(i + offset) % len(prompts)]
        weights = None
        if weighted:
            first = (i + offset) % MEMBERS
            vector = [0.0] * MEMBERS
            vector[first], vector[(first + 1) % MEMBERS] = PAIR_WEIGHTS
            weights = tuple(vector)
        out.append(
            GenRequest(
                target,
                sampling if lengths is None else fixed(max(1, lengths[prompt])),
                messages=[{"role": "user", "content": prompt}],
                request_id=f"bench-{offset + i}",
                mixture_weights=weights,
            )
        )
    return out


def fixed(tokens: int) -> Sampling:
    return Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def natural(tokens: int) -> Sampling:
    return Sampling(max_tokens=tokens, temperature=0.0)


# --- timing ------------------------------------------------------------------------------------------------


def _ok(results: Sequence[GenResult | BaseException], what: str) -> list[GenResult]:
    for r in results:
        if isinstance(r, BaseException):
            raise RuntimeError(f"{what}: a request failed: {r!r}") from r
    return [r for r in results if isinstance(r, GenResult)]


async def timed_round(engine: Engine, requests: list[GenRequest], what: str) -> dict[str, Any]:
    """All ``requests`` at once: wall time, completion tokens, tokens/s."""
    start = time.perf_counter()
    results = _ok(await engine.generate(requests), what)
    wall = time.perf_counter() - start
    tokens = [r.completion_tokens for r in results]
    return {
        "wall_s": wall,
        "tokens": sum(tokens),
        "answer_tokens": sorted(tokens, reverse=True),
        "tokens_per_s": sum(tokens) / wall,
    }


def clients(requests: list[GenRequest], n: int) -> list[list[GenRequest]]:
    """``requests`` dealt to ``n`` clients (client c sends requests c, c + n, ...)."""
    return [requests[c::n] for c in range(n)]


async def timed_groups(
    engine: Engine, groups: dict[str, list[list[GenRequest]]], what: str, lengths: dict[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Every group's clients started together, each sending its requests one after another (closed loop): each
    group's tokens over the time until its last answer, and ``all``: every token over the time until the last.
    ``lengths``, when given, collects each prompt's answer length (tokens)."""
    start = time.perf_counter()
    lengths = {} if lengths is None else lengths

    async def client(requests: list[GenRequest]) -> tuple[float, list[GenResult]]:
        results: list[GenResult] = []
        for request in requests:
            results += _ok(await engine.generate([request]), what)
            if request.messages:
                lengths[request.messages[-1]["content"]] = results[-1].completion_tokens
        return time.perf_counter() - start, results

    async def group(members: list[list[GenRequest]]) -> list[tuple[float, list[GenResult]]]:
        return await asyncio.gather(*(client(requests) for requests in members))

    ended_by_group = await asyncio.gather(*(group(members) for members in groups.values()))
    out: dict[str, dict[str, Any]] = {}
    for name, ended in zip(groups, ended_by_group, strict=True):
        tokens = [r.completion_tokens for _, results in ended for r in results]
        wall = max(w for w, _ in ended)
        out[name] = {"wall_s": wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall, "answers": len(tokens)}
    wall = max(part["wall_s"] for part in out.values())
    tokens = sum(part["tokens"] for part in out.values())
    out["all"] = {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}
    return out


async def timed_clients(
    engine: Engine, requests: list[list[GenRequest]], what: str, lengths: dict[str, int] | None = None
) -> dict[str, Any]:
    """``requests`` per client, the clients started together, each closed loop: wall time, tokens, tokens/s."""
    return (await timed_groups(engine, {"clients": requests}, what, lengths))["clients"]


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tokens/s, and every round's tokens/s."""
    ranked = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "rounds_tokens_per_s": [round(r["tokens_per_s"], 2) for r in rounds]}


def median_groups(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {name: median_round([r[name] for r in rounds]) for name in rounds[0]}


# --- the benchmark ------------------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int
    step_rounds: int
    max_tokens: int
    step_tokens: int
    n: int  # concurrent requests
    wide: int  # the larger concurrency (0: skipped)
    torch: bool
    per_client: int = 4  # requests each client sends one after another in the throughput measurements


class Bench:
    def __init__(self, models: Models, plan: Plan, work: Path) -> None:
        self.models = models
        self.plan = plan
        self.work = work
        self.arrow = models.arrow_target()
        self.weighted = models.weighted_target()
        self.plain = models.plain_target()
        self.results: dict[str, Any] = {"load": {}}

    def vllm_engine(self, rank: int) -> VLLMEngine:
        config = VLLMConfig(
            port_start=free_port(),
            max_model_len=1024,
            max_loras=4,  # the arrow slot, the weighted slot, the plain adapter
            max_lora_rank=rank,
            kv_cache_gib=2,
            log_dir=self.work / f"vllm-rank{rank}",
            mixture_dir=self.work / "mixtures",
            startup_timeout_s=900,
        )
        self.results.setdefault("vllm", {"lora_ops": config.lora_ops, "compiled": config.compile})
        return VLLMEngine(config)

    def requests(
        self,
        target: Target,
        n: int,
        sampling: Sampling,
        *,
        weighted: bool = False,
        offset: int = 0,
        lengths: Mapping[str, int] | None = None,
    ) -> list[GenRequest]:
        return chat_requests(
            target, n, sampling, self.models.prompts, weighted=weighted, offset=offset, lengths=lengths
        )

    def mark(self, name: str) -> None:
        self.results["load"][name] = load_text()
        say(f"-- {name}: load average {self.results['load'][name]}")

    # warm-up

    async def warm(self, engine: Engine, label: str, targets: list[tuple[str, Target, bool]]) -> None:
        """One request per target (starts the server, loads adapters, writes slots, fits the mixture), then one
        short fixed-length round (at most 8 tokens) at each batch size the benchmark uses."""
        for name, target, weighted in targets:
            start = time.perf_counter()
            _ok(await engine.generate(self.requests(target, 1, fixed(2), weighted=weighted)), f"warm-up {name}")
            say(f"{label}: {name} ready in {time.perf_counter() - start:.1f} s (first request)")
        sizes = sorted({1, self.plan.n // 2, self.plan.n, *([self.plan.wide] if self.plan.wide else [])})
        start = time.perf_counter()
        for size in sizes:
            for name, target, weighted in targets:
                reqs = self.requests(target, size, fixed(min(self.plan.max_tokens, 8)), weighted=weighted)
                _ok(await engine.generate(reqs), f"warm-up {name}")
        say(f"{label}: warmed at batch sizes {sizes} in {time.perf_counter() - start:.1f} s")

    # 1 and 5: throughput

    async def throughput(self, vllm: Engine, torch_engine: Engine | None) -> None:
        """Natural length: the mixture's answers end at EOS; the plain adapter then writes answers of the very same
        lengths (each prompt's mixture answer length, ignore_eos), so both produce the same tokens for the same
        prompts and tokens/s compares the cost of serving them. Its own answers (EOS) are timed too."""
        p = self.plan
        workloads = {"natural": natural(p.max_tokens), "fixed": fixed(p.max_tokens)}
        scenarios = [p.n, *([p.wide] if p.wide else [])]
        half = p.n // 2
        single: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        beside: dict[tuple[str, str], list[dict[str, dict[str, Any]]]] = {}
        for r in range(p.rounds):
            for workload, sampling in workloads.items():
                matched: dict[int, dict[str, int]] = {}  # per scenario: the mixture's answer length per prompt
                for n in scenarios:
                    per = p.per_client if n == p.n else 1  # the wide scenario: one wave (the torch path is slow)
                    # natural: the vLLM mixture's run (first) records each prompt's answer length, the plain
                    # adapter's replays them
                    lengths = matched.setdefault(n, {}) if workload == "natural" else None
                    paths: list[tuple[str, Engine, Target, Mapping[str, int] | None]] = [
                        ("vllm arrow mixture", vllm, self.arrow, None),
                        ("vllm plain adapter", vllm, self.plain, lengths),
                    ]
                    if workload == "natural":
                        paths.append((OWN_ANSWERS, vllm, self.plain, None))
                    if workload == "fixed" and n == p.n:
                        paths.append(("vllm weighted mixture", vllm, self.weighted, None))
                    if torch_engine is not None:
                        paths.append(("torch arrow mixture", torch_engine, self.arrow, None))
                    for path, engine, target, replayed in paths:
                        reqs = self.requests(
                            target, n * per, sampling, weighted=target is self.weighted, lengths=replayed
                        )
                        record = lengths if path == "vllm arrow mixture" else None
                        got = await timed_clients(engine, clients(reqs, n), f"{path}, {workload}, {n}", record)
                        single.setdefault((workload, n, path), []).append(got)
                        say(
                            f"round {r + 1} {workload:7s} {n:3d} concurrent  {path:22s} {got['tokens_per_s']:7.1f} "
                            f"tokens/s ({got['tokens']} tokens in {got['wall_s']:.2f} s)"
                        )
                beside_paths: list[tuple[str, Engine]] = [("vllm", vllm)]
                if torch_engine is not None:
                    beside_paths.append(("torch", torch_engine))
                for path, engine in beside_paths:
                    count = half * p.per_client
                    lengths = matched.get(p.n) if workload == "natural" else None
                    groups = {
                        "mixture": clients(self.requests(self.arrow, count, sampling), half),
                        "plain": clients(
                            self.requests(self.plain, count, sampling, offset=count, lengths=lengths), half
                        ),
                    }
                    got_groups = await timed_groups(engine, groups, f"{path} beside, {workload}")
                    beside.setdefault((workload, path), []).append(got_groups)
                    rates = {name: f"{g['tokens_per_s']:.1f}" for name, g in got_groups.items()}
                    say(
                        f"round {r + 1} {workload:7s} {half}+{half} beside     {path:22s} mixture {rates['mixture']}, "
                        f"plain {rates['plain']}, all {rates['all']} tokens/s"
                    )
            say(f"-- throughput round {r + 1}/{p.rounds} done (load {load_text()})")
        out: dict[str, Any] = {}
        for (workload, n, path), rounds in single.items():
            out.setdefault(workload, {}).setdefault(str(n), {})[path] = median_round(rounds)
        for (workload, path), groups_rounds in beside.items():
            out[workload].setdefault(f"{half}+{half}", {})[path] = median_groups(groups_rounds)
        self.results["throughput"] = out

    # 2: decode cost

    async def decode_cost(self, vllm: Engine) -> None:
        p = self.plan
        long = p.step_tokens
        runs: dict[int, dict[str, list[float]]] = {}
        models = [("arrow mixture", self.arrow), ("plain adapter", self.plain)]
        for r in range(p.step_rounds):
            for batch in sorted({1, p.n}):
                for name, target in models if r % 2 == 0 else models[::-1]:  # who goes first alternates
                    one = await timed_round(vllm, self.requests(target, batch, fixed(1)), f"decode {name}")
                    full = await timed_round(vllm, self.requests(target, batch, fixed(long)), f"decode {name}")
                    step_ms = (full["wall_s"] - one["wall_s"]) / (long - 1) * 1000
                    runs.setdefault(batch, {}).setdefault(name, []).append(step_ms)
                    say(f"round {r + 1} decode batch {batch:2d} {name:14s} {step_ms:6.1f} ms/step")
        out: dict[str, Any] = {}
        for batch, by_name in runs.items():
            mix, plain = (statistics.median(by_name[name]) for name, _ in models)
            out[str(batch)] = {
                "mixture_ms": mix,
                "plain_ms": plain,
                "ratio": mix / plain,
                "runs": {name: [round(v, 2) for v in values] for name, values in by_name.items()},
            }
        self.results["decode"] = {"tokens": long, "rounds": p.step_rounds, "batches": out}

    # 3: mixed batch vs apart

    async def mixed_batch(self, vllm: Engine) -> None:
        p = self.plan
        half = p.n // 2
        sampling = fixed(p.max_tokens)
        mixture = self.requests(self.arrow, half, sampling)
        plain = self.requests(self.plain, half, sampling, offset=half)
        mixed = [req for pair in zip(mixture, plain, strict=True) for req in pair]
        walls: dict[str, list[float]] = {"mixed": [], "mixture alone": [], "plain alone": []}
        for r in range(p.rounds):
            walls["mixed"].append((await timed_round(vllm, mixed, "mixed batch"))["wall_s"])
            walls["mixture alone"].append((await timed_round(vllm, mixture, "mixture alone"))["wall_s"])
            walls["plain alone"].append((await timed_round(vllm, plain, "plain alone"))["wall_s"])
            say(
                f"round {r + 1} {half}+{half} in one batch {walls['mixed'][-1]:.2f} s; apart: mixture "
                f"{walls['mixture alone'][-1]:.2f} s, plain {walls['plain alone'][-1]:.2f} s"
            )
        med = {name: statistics.median(values) for name, values in walls.items()}
        apart_sum = med["mixture alone"] + med["plain alone"]
        apart_max = max(med["mixture alone"], med["plain alone"])
        self.results["mixed_batch"] = {
            "requests": f"{half}+{half}",
            "tokens": p.max_tokens,
            "wall_s": med,
            "over_sum": med["mixed"] / apart_sum,
            "over_max": med["mixed"] / apart_max,
            "runs": {name: [round(v, 3) for v in values] for name, values in walls.items()},
        }

    # 4: the plain adapter on a server sized for mixtures

    async def rank_sizing(self, wide: VLLMEngine) -> None:
        """The plain adapter on the server sized for mixtures and on a rank-8 one, both up, rounds taking turns."""
        p = self.plan
        small = self.vllm_engine(PLAIN_RANK)
        try:
            start = time.perf_counter()
            await small.ensure_server(self.plain)
            say(f"vllm (--max-lora-rank {PLAIN_RANK}): server up in {time.perf_counter() - start:.0f} s")
            await self.warm(small, f"vllm rank {PLAIN_RANK}", [("plain", self.plain, False)])
            reqs = clients(self.requests(self.plain, p.n * p.per_client, fixed(p.max_tokens)), p.n)
            servers = [(MIXTURE_RANK, wide), (PLAIN_RANK, small)]
            rounds: dict[int, list[dict[str, Any]]] = {MIXTURE_RANK: [], PLAIN_RANK: []}
            for r in range(max(p.rounds, 3)):
                for rank, engine in servers if r % 2 == 0 else servers[::-1]:
                    rounds[rank].append(await timed_clients(engine, reqs, f"plain on the rank-{rank} server"))
                    say(f"round {r + 1} plain adapter, --max-lora-rank {rank}: {rounds[rank][-1]['tokens_per_s']:.1f}")
        finally:
            await small.close()
        self.results["rank_sizing"] = {str(rank): median_round(values) for rank, values in rounds.items()}

    # phases

    async def run(self) -> None:
        p = self.plan
        self.mark("start")
        vllm = self.vllm_engine(MIXTURE_RANK)
        torch_engine: Engine | None = None
        try:
            await vllm.mixtures.prepare()
            if not vllm.serves_mixture(self.arrow):
                raise SystemExit("this vLLM does not run moerge's mixture op (not the CPU platform?)")
            start = time.perf_counter()
            await vllm.ensure_server(self.plain)
            status = await vllm.status()
            say(f"vllm (--max-lora-rank {MIXTURE_RANK}): server up in {time.perf_counter() - start:.0f} s {status}")
            self.results["vllm"]["startup_s"] = [s.get("startup_s") for s in status]
            await self.warm(
                vllm,
                "vllm",
                [("arrow mixture", self.arrow, False), ("plain", self.plain, False), ("weighted", self.weighted, True)],
            )
            if p.torch:
                from serving.torch_engine import TorchEngine

                torch_engine = TorchEngine()
                await self.warm(
                    torch_engine, "torch", [("arrow mixture", self.arrow, False), ("plain", self.plain, False)]
                )
            self.mark("after warm-up")
            await self.throughput(vllm, torch_engine)
            if torch_engine is not None:
                await torch_engine.close()
                torch_engine = None
            self.mark("after throughput")
            await self.decode_cost(vllm)
            await self.mixed_batch(vllm)
            await self.rank_sizing(vllm)
        finally:
            if torch_engine is not None:
                await torch_engine.close()
            await vllm.close()
        self.mark("end")


# --- the report ---------------------------------------------------------------------------------------------


def targets(results: dict[str, Any], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    half = n // 2
    answers = n * results["params"].get("requests_per_client", 1)
    for workload, scenarios in results["throughput"].items():
        part = scenarios[str(n)]
        mixture, plain = part["vllm arrow mixture"], part["vllm plain adapter"]
        ratio = mixture["tokens_per_s"] / plain["tokens_per_s"]
        out[f"{workload}: vLLM mixture >= 0.8x vLLM plain tokens/s ({n} concurrent)"] = {
            "ratio": round(ratio, 3),
            "met": ratio >= 0.8,
            "tokens_per_answer": {
                "mixture": mixture["tokens"] / answers,
                "plain": plain["tokens"] / answers,  # natural: the mixture's lengths, replayed
                **({"plain, own answers": part[OWN_ANSWERS]["tokens"] / answers} if OWN_ANSWERS in part else {}),
            },
        }
    decode = results["decode"]["batches"]
    worst = max(row["ratio"] for row in decode.values())
    out["decode: mixture ms/step <= 1.5x plain"] = {
        "ratio": {batch: round(row["ratio"], 3) for batch, row in decode.items()},
        "met": worst <= 1.5,
    }
    mixed = results["mixed_batch"]
    out[f"{half}+{half} in one batch no slower than the two apart (sum)"] = {
        "ratio": round(mixed["over_sum"], 3),
        "met": mixed["over_sum"] <= 1.0,
    }
    sizing = results["rank_sizing"]
    ratio = sizing[str(MIXTURE_RANK)]["tokens_per_s"] / sizing[str(PLAIN_RANK)]["tokens_per_s"]
    out[f"plain adapter on a rank-{MIXTURE_RANK} server at most 10% slower than on rank {PLAIN_RANK} (>= 0.9x)"] = {
        "ratio": round(ratio, 3),
        "met": ratio >= 0.9,
    }
    return out


def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def report(results: dict[str, Any]) -> str:
    p = results["params"]
    n = p["concurrency"]
    load = results["load"]
    v = results["vllm"]
    lines = [
        f"`bench/vllm_mixtures.py`: SmolLM2-135M-Instruct, float32, {results['machine']}; members: "
        f"{results['adapter_source']}; the plain adapter: `{results['plain_adapter']}`. vLLM: one managed server "
        f"(`--max-lora-rank {MIXTURE_RANK}`, moerge's `{v['lora_ops']}` LoRA ops, "
        f"{'compiled' if v['compiled'] else 'eager'}), a mixture served as one adapter slot; torch: moerge's "
        f"TorchEngine in process (its default batches of at most 16 rows). Greedy chat requests; median of "
        f"{p['rounds']} rounds, the paths taking turns. Load average (1/5/15 min): "
        + ", ".join(f"{k} {val}" for k, val in load.items())
        + " (the machine is shared).",
        "",
        f"Prompts: {results.get('prompts', 'four generic prompts')}. Throughput, tokens/s (completion tokens / wall "
        f"time; natural = the mixture's answers end at EOS within {p['max_tokens']} tokens and the plain adapter "
        "writes answers of the same lengths (each prompt's mixture answer length, `ignore_eos`: the same tokens for "
        f"the same prompts), `{OWN_ANSWERS}` its own answers (EOS); fixed = exactly {p['max_tokens']}; {n} "
        f"concurrent: {n} clients, each sending {p.get('requests_per_client', 1)} requests one after another; "
        f"{p['wide']}: one wave of {p['wide']} requests):",
        "",
        "| workload | concurrent | path | tokens/s | tokens | wall s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for workload, scenarios in results["throughput"].items():
        for scenario, paths in scenarios.items():
            if "+" in scenario:
                for path, groups in paths.items():
                    for group in ("mixture", "plain", "all"):
                        g = groups[group]
                        label = f"{path}: {'arrow mixture' if group == 'mixture' else group} (beside)"
                        lines.append(
                            f"| {workload} | {scenario} | {label} | {fmt(g['tokens_per_s'])} | {g['tokens']} | "
                            f"{g['wall_s']:.2f} |"
                        )
                continue
            for path, r in paths.items():
                lines.append(
                    f"| {workload} | {scenario} | {path} | {fmt(r['tokens_per_s'])} | {r['tokens']} | "
                    f"{r['wall_s']:.2f} |"
                )
    d = results["decode"]
    lines += [
        "",
        f"Decode step in vLLM, ms (({d['tokens']}-token generation - 1-token generation) / {d['tokens'] - 1}, "
        f"fixed length, median of {d['rounds']} interleaved rounds):",
        "",
        "| batch | plain adapter | arrow top-2 of 6 | mixture / plain |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for batch, row in d["batches"].items():
        lines.append(f"| {batch} | {row['plain_ms']:.1f} | {row['mixture_ms']:.1f} | {row['ratio']:.2f}x |")
    m = results["mixed_batch"]
    w = m["wall_s"]
    s = results["rank_sizing"]
    lines += [
        "",
        f"- {m['requests']} mixture + plain requests ({m['tokens']} tokens each) in one batch: {w['mixed']:.2f} s; "
        f"apart {w['mixture alone']:.2f} s (mixture) + {w['plain alone']:.2f} s (plain) = "
        f"{w['mixture alone'] + w['plain alone']:.2f} s: the mixed batch takes {m['over_sum']:.2f}x their sum, "
        f"{m['over_max']:.2f}x the longer one.",
        f"- the plain adapter, {n} concurrent fixed-length requests: {fmt(s[str(MIXTURE_RANK)]['tokens_per_s'])} "
        f"tokens/s on the `--max-lora-rank {MIXTURE_RANK}` server vs {fmt(s[str(PLAIN_RANK)]['tokens_per_s'])} on a "
        f"`--max-lora-rank {PLAIN_RANK}` one (both servers up, rounds taking turns).",
    ]
    fixed_n = results["throughput"]["fixed"][str(n)]
    if "vllm weighted mixture" in fixed_n:
        lines.append(
            f"- weighted mixture of the six ({PAIR_WEIGHTS[0]:.2f}/{PAIR_WEIGHTS[1]:.2f} on two members, each request "
            f"its own pair), {n} concurrent fixed-length: "
            f"{fmt(fixed_n['vllm weighted mixture']['tokens_per_s'])} tokens/s in vLLM."
        )
    lines += ["", "Targets (issue 23):", ""]
    for name, t in results["targets"].items():
        figure = t["ratio"]
        shown = (
            ", ".join(f"batch {k} {val:.2f}x" for k, val in figure.items())
            if isinstance(figure, dict)
            else f"{figure:.2f}x"
        )
        lengths = ""
        if name.startswith("natural") and "tokens_per_answer" in t:
            per = t["tokens_per_answer"]
            lengths = f" (answers of {per['mixture']:.1f} tokens on average, the plain adapter's {per['plain']:.1f}"
            if "plain, own answers" in per:
                lengths += f"; its own answers {per['plain, own answers']:.1f}"
            lengths += ")"
        lines.append(f"- {name}: {shown}{lengths} -> **{'met' if t['met'] else 'not met'}**")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the throughput and batch measurements")
    parser.add_argument("--step-rounds", type=int, default=5, help="rounds of the decode-step measurement")
    parser.add_argument("--max-tokens", type=int, default=32, help="fixed length (and natural length's cap)")
    parser.add_argument("--step-tokens", type=int, default=64, help="generation length of the decode-step measure")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests (N)")
    parser.add_argument(
        "--requests-per-client", type=int, default=4, help="throughput: requests each of the N clients sends in turn"
    )
    parser.add_argument("--wide", type=int, default=64, help="the larger concurrency (0: skip)")
    parser.add_argument("--skip-torch", action="store_true", help="leave out the torch engine (slow)")
    parser.add_argument("--stand-ins", action="store_true", help="random rank-8 adapters even if demo experts exist")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 4 concurrent, 8 tokens, no --wide")
    parser.add_argument("--no-write", action="store_true", help="print only: leave RESULTS.md and the JSON alone")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the RESULTS.md section from the last run's JSON"
    )
    args = parser.parse_args()
    if args.report_only:
        saved = ROOT / "bench/results/vllm_mixtures.json"
        results = json.loads(saved.read_text())
        results["targets"] = targets(results, results["params"]["concurrency"])
        saved.write_text(json.dumps(results, indent=1) + "\n")
        write_section(ROOT / "bench/RESULTS.md", SECTION, report(results))
        say(report(results))
        return
    if args.quick:
        args.rounds, args.step_rounds, args.concurrency, args.max_tokens, args.step_tokens, args.wide = 1, 1, 4, 8, 8, 0
        args.requests_per_client = 1
    if args.concurrency < 2 or args.step_tokens < 2 or args.rounds < 1 or args.step_rounds < 1:
        parser.error("--concurrency and --step-tokens need at least 2, the rounds at least 1")
    if args.requests_per_client < 1:
        parser.error("--requests-per-client needs at least 1")
    plan = Plan(
        rounds=args.rounds,
        step_rounds=args.step_rounds,
        max_tokens=args.max_tokens,
        step_tokens=args.step_tokens,
        n=args.concurrency,
        wide=args.wide,
        torch=not args.skip_torch,
        per_client=args.requests_per_client,
    )
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="moerge-vllm-mixtures-"))
    ok = False
    try:
        models = find_models(args.stand_ins, work)
        say(f"members: {models.source}: {', '.join(models.slugs)}; plain adapter: {models.plain_slug}")
        bench = Bench(models, plan, work)
        asyncio.run(bench.run())
        ok = True
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (the vLLM servers' logs are there)", file=sys.stderr)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "adapter_source": models.source,
        "prompts": models.prompt_source,
        "plain_adapter": models.plain_slug,
        "members": list(models.slugs),
        "params": {k: v for k, v in vars(args).items() if k != "no_write"},
        **bench.results,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    results["targets"] = targets(results, plan.n)
    body = report(results)
    say("\n" + body + f"\n\n(the whole run took {results['elapsed_s']:.0f} s)")
    if args.no_write:
        return
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/vllm_mixtures.json").write_text(json.dumps(results, indent=1) + "\n")
    write_section(ROOT / "bench/RESULTS.md", SECTION, body)


if __name__ == "__main__":
    main()
