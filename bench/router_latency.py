"""Benchmark: the `embedding` router's decision latency at 10, 100, 1,000 and 10,000 registered experts.

Synthetic experts (each with a description and four example prompts drawn from a topic vocabulary) are
inserted into a fresh SQLite registry; one composition routes over all of them. For each size it reports
  - fit: embedding every expert once (stored per expert; never redone per request),
  - router: `route()` on the fitted state, the query's embedding included (every query is new, so the
    embedder's memo never answers),
  - decide: the whole `RoutingService.decide` a request pays (the registry-epoch check that keeps the
    memoized candidates and stored states valid, then route),
  - embed: the query's embedding alone.
Writes bench/results/router_latency.json and a section of bench/RESULTS.md.

    .venv/bin/python bench/router_latency.py [--sizes 10 100 1000 10000] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from evals.harness import percentile  # noqa: E402

TOPICS = [
    "tax law", "organic chemistry", "python packaging", "medieval history", "sourdough baking", "jazz harmony",
    "kubernetes networking", "marine biology", "tennis coaching", "contract negotiation", "linear algebra",
    "rust lifetimes", "bird watching", "wine pairing", "orbital mechanics", "urban gardening", "poetry meter",
    "cryptography", "first aid", "sql tuning", "film editing", "climbing safety", "public speaking", "geology",
]  # fmt: skip
VERBS = ["explain", "compare", "fix", "summarize", "estimate", "plan", "translate", "check", "design", "teach"]
OBJECTS = ["a beginner's question", "an edge case", "the basics", "a common mistake", "a worked example",
           "the history", "a checklist", "the trade-offs", "a quick rule of thumb", "an exam question"]  # fmt: skip


def synthetic_expert(i: int, rng: random.Random) -> dict[str, Any]:
    topic, sub = rng.sample(TOPICS, 2)
    prompts = [f"Can you {rng.choice(VERBS)} {rng.choice(OBJECTS)} about {topic}?" for _ in range(3)]
    prompts.append(f"How does {topic} relate to {sub}? ({i})")
    return {
        "slug": f"syn-{i:05d}",
        "description": f"Synthetic expert {i}: {topic}, with some {sub}.",
        "task_description": f"Answers questions about {topic}.",
        "example_prompts": prompts,
    }


def queries(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"Please {rng.choice(VERBS)} {rng.choice(OBJECTS)} on {rng.choice(TOPICS)} (case {n}, {rng.random():.6f})"
        for n in range(count)
    ]


async def measure(size: int, n_queries: int, root: Path) -> dict[str, Any]:
    from sqlalchemy import select

    from registry import db
    from registry.compositions import CompositionView
    from registry.models import Composition, CompositionMember, Expert
    from routers.query import RouterContext
    from routers.query.embedder import shared_embedder
    from routers.query.service import RoutingService

    url = f"sqlite+aiosqlite:///{root / f'bench-{size}.db'}"
    await asyncio.to_thread(db.upgrade, url)  # Alembic runs its own event loop
    engine = db.make_engine(url)
    embedder = shared_embedder()
    context = RouterContext(embedder=embedder)
    rng = random.Random(size)
    try:
        async with db.make_sessionmaker(engine)() as session:
            experts = [
                Expert(id=uuid.uuid4(), kind="base", manifest_sha256="0" * 64, **synthetic_expert(i, rng))
                for i in range(size)
            ]
            session.add_all(experts)
            comp = Composition(id=uuid.uuid4(), name="bench", router="embedding", router_params={}, k=1)
            comp.members = [CompositionMember(expert_id=e.id) for e in experts]
            comp.declared_experts = [e.slug for e in experts]
            session.add(comp)
            await session.commit()

            experts = list(await session.scalars(select(Expert).order_by(Expert.slug)))  # evals loaded too
            routing = RoutingService(session, context)
            started = time.perf_counter()
            await routing.fit("embedding", {}, experts)
            fit_s = time.perf_counter() - started

            view = CompositionView.of(comp)
            router, candidates, prepared = await routing.routing(view)
            for q in queries(10, seed=size * 10 + 9):  # warm-up (thread pool, BLAS)
                await router.route(q, candidates, prepared, 1)

            def timed(values: list[float], start: float) -> None:
                values.append((time.perf_counter() - start) * 1000)

            embed_ms: list[float] = []
            for q in queries(n_queries, seed=size * 10 + 1):
                start = time.perf_counter()
                embedder.encode([q])
                timed(embed_ms, start)
            router_ms: list[float] = []
            for q in queries(n_queries, seed=size * 10 + 2):
                start = time.perf_counter()
                await router.route(q, candidates, prepared, 1)
                timed(router_ms, start)
            decide_ms: list[float] = []
            for q in queries(n_queries, seed=size * 10 + 3):
                start = time.perf_counter()
                await routing.decide(view, q)
                timed(decide_ms, start)
    finally:
        await engine.dispose()
    result: dict[str, Any] = {"experts": size, "fit_s": round(fit_s, 2), "embedding_backend": embedder.backend}
    for name, values in (("router", router_ms), ("decide", decide_ms), ("embed", embed_ms)):
        result[f"{name}_p50_ms"] = round(percentile(values, 50), 2)
        result[f"{name}_p95_ms"] = round(percentile(values, 95), 2)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "router_latency.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moerge-bench-") as tmp:
        rows = [asyncio.run(measure(size, args.queries, Path(tmp))) for size in args.sizes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = [
        "`bench/router_latency.py`: the `embedding` router (all-MiniLM-L6-v2 through "
        f"{rows[-1]['embedding_backend']}, top-1) over N synthetic experts "
        f"(4 example prompts + 2 description rows each), {args.queries} new queries per size, SQLite registry.",
        "",
        "| experts | fit (s, once) | router p50 ms | router p95 ms | decide p50 ms | decide p95 ms | embed p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']:,} | {r['fit_s']} | {r['router_p50_ms']} | {r['router_p95_ms']} | "
            f"{r['decide_p50_ms']} | {r['decide_p95_ms']} | {r['embed_p50_ms']} |"
        )
    largest = rows[-1]

    def verdict(ms: float) -> str:
        return "meets" if ms <= 20 else "misses"

    lines += [
        "",
        f"Target: at most 20 ms p50 at 10,000 experts, the query's embedding included: at {largest['experts']:,} "
        f"experts the router's p50 is {largest['router_p50_ms']} ms ({verdict(largest['router_p50_ms'])} it) and "
        f"`decide`, what a request pays (the registry-epoch check that keeps candidates and router states "
        f"memoized, then the route), {largest['decide_p50_ms']} ms ({verdict(largest['decide_p50_ms'])} it). "
        "At 10,000 experts the 60,000 x 384 float32 example matrix (92 MB) is read once per query (~4 ms), "
        "and it and the encoder's weights evict each other from the cache: the embedding takes ~6 ms alone and "
        "~8-10 ms between two matrix products.",
    ]
    write_section(ROOT / "bench" / "RESULTS.md", "Embedding router decision latency", "\n".join(lines))


if __name__ == "__main__":
    main()
