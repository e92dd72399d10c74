"""Benchmark: what routing and aggregation add over a direct expert call, per router and aggregator.

Against a running `moerge demo` with the compositions of scripts/eval_demo.sh. The same prompts (eval
split, a few per task) go one at a time, interleaved across models, to the task's own expert directly and
to each composition; reported per composition: end-to-end p50 / p95, the p50 added over the direct call,
and the router's own decision time (server-side, from POST /api/route). Writes bench/results/
compose_overhead.json and a section of bench/RESULTS.md.

    MOERGE_URL=http://127.0.0.1:8200 .venv/bin/python bench/compose_overhead.py [--per-task 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from core.settings import Settings  # noqa: E402
from evals.harness import TASK_PLACEHOLDER, percentile  # noqa: E402
from evals.tasks import TASKS, chat_messages  # noqa: E402

DIRECT = "{task}-lora"
COMPOSITIONS = [
    ("embedding, k=1 (`auto`)", "auto"),
    ("two_step, k=1", "two-step"),
    ("skills, k=1", "skills"),
    ("instruct, k=1", "instruct"),
    ("kshot, k=1", "kshot-{task}"),
    ("embedding k=2 + vote", "pair-vote"),
    ("embedding k=2 + synthesize", "pair-synthesize"),
    ("embedding k=2 + select", "pair-select"),
]


def model_for(model: str, task: str) -> str:
    return model.replace(TASK_PLACEHOLDER, task.replace("_", "-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=5, help="prompts per task")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compose_overhead.json")
    args = parser.parse_args()
    settings = Settings.from_env()
    headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    client = httpx.Client(base_url=settings.api_url, headers=headers, timeout=600)
    prompts = [(task, ex) for task in TASKS for ex in task.examples("eval", args.per_task)]
    models = [("direct expert", DIRECT), *COMPOSITIONS]
    latency: dict[str, list[float]] = {label: [] for label, _ in models}
    route_ms: dict[str, list[float]] = {label: [] for label, _ in COMPOSITIONS}
    for task, ex in prompts:
        for label, model in models:  # interleaved: drift in machine load hits every model alike
            name = model_for(model, task.name)
            body = {
                "model": name,
                "messages": chat_messages(ex.prompt),
                "max_tokens": task.max_new_tokens,
                "temperature": 0,
            }
            start = time.perf_counter()
            resp = client.post("/v1/chat/completions", json=body)
            latency[label].append((time.perf_counter() - start) * 1000)
            resp.raise_for_status()
            if label in route_ms:
                decision = client.post("/api/route", json={"model": name, "query": ex.prompt})
                decision.raise_for_status()
                route_ms[label].append(decision.json()["latency_ms"])
    direct_p50 = percentile(latency["direct expert"], 50)
    rows: list[dict[str, Any]] = []
    for label, model in models:
        p50 = percentile(latency[label], 50)
        rows.append(
            {
                "label": label,
                "model": model,
                "p50_ms": round(p50, 1),
                "p95_ms": round(percentile(latency[label], 95), 1),
                "added_p50_ms": round(p50 - direct_p50, 1),
                "route_p50_ms": round(percentile(route_ms[label], 50), 2) if label in route_ms else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": len(prompts), "rows": rows}, indent=1) + "\n")
    lines = [
        f"`bench/compose_overhead.py`: {len(prompts)} eval-split prompts ({args.per_task} per task), one request at "
        "a time, interleaved across models, greedy, each task's max_tokens; demo experts on one vLLM server.",
        "",
        "| model | p50 ms | p95 ms | added p50 ms | router decision p50 ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        route = "–" if r["route_p50_ms"] is None else f"{r['route_p50_ms']}"
        lines.append(f"| {r['label']} | {r['p50_ms']} | {r['p95_ms']} | {r['added_p50_ms']} | {route} |")
    lines += [
        "",
        "added p50 = the model's p50 minus the direct expert call's p50 (a k = 1 router that picks another "
        "expert also changes how much is generated); router decision = server-side time of POST /api/route.",
    ]
    write_section(ROOT / "bench" / "RESULTS.md", "Routing and aggregation overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
