"""The evaluation harness: run models or compositions over the tasks' splits through moerge's own /v1
endpoint, and write a markdown table, a JSON file and a PNG plot.

Queries go through the real serving path (API -> engine), many in flight at once so that the engine can
batch them; latency is measured per query at the client, throughput over the whole run of one model.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from evals.tasks import TASKS, Task, chat_messages, get_task
from serving.engine import GenerationFailed


@dataclass
class QueryOutcome:
    task: str
    prompt: str
    answer: str
    output: str
    correct: bool
    latency_s: float
    completion_tokens: int
    experts: str = ""  # x-moerge-experts: who answered (for routing accuracy)
    router: str = "none"  # x-moerge-router: "none" when the model is not a composition
    expected_expert: str = ""  # the task's own expert, when known


@dataclass
class EvalRow:
    model: str
    accuracy: dict[str, float]
    mean: float
    latency_p50_ms: float
    latency_p95_ms: float
    tokens_per_s: float
    n_per_task: int
    queries: int
    wall_s: float
    outcomes: list[QueryOutcome] = field(default_factory=list, repr=False)
    routing_accuracy: float | None = None  # compositions: share of queries routed to their task's expert


TASK_PLACEHOLDER = "{task}"
"""In a model name, replaced by each query's task (underscores as dashes): one composition per task."""
ORACLE = "oracle"
"""Pseudo-model: every query goes to its own task's expert (the upper bound of query-level routing)."""


# How long a query keeps retrying while the engine answers 503 (a vLLM server starting takes 30-60 s here).
UNAVAILABLE_PATIENCE_S = 600.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) without numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def _ask(
    client: httpx.AsyncClient,
    model: str,
    task: Task,
    prompt: str,
    answer: str,
    gate: asyncio.Semaphore,
    expected_expert: str = "",
) -> QueryOutcome:
    if model == ORACLE:
        if not expected_expert:
            raise GenerationFailed(f"oracle routing needs an expert for task {task.name!r}", param="expert_for")
        model = expected_expert
    elif TASK_PLACEHOLDER in model:  # one composition per task, e.g. `kshot-{task}`
        model = model.replace(TASK_PLACEHOLDER, task.name.replace("_", "-"))
    body = {"model": model, "messages": chat_messages(prompt), "max_tokens": task.max_new_tokens, "temperature": 0.0}
    deadline = time.monotonic() + UNAVAILABLE_PATIENCE_S
    async with gate:
        while True:
            start = time.perf_counter()
            resp = await client.post("/v1/chat/completions", json=body)
            latency = time.perf_counter() - start
            # 503: a server (re)starting, e.g. for a merged adapter of a higher rank; come back as told.
            if resp.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(min(5.0, max(1.0, float(resp.headers.get("retry-after", "5")))))
    if resp.status_code != 200:
        raise GenerationFailed(f"{model}: HTTP {resp.status_code}: {resp.text[:300]}", param="model")
    data = resp.json()
    output = data["choices"][0]["message"]["content"]
    return QueryOutcome(
        task.name,
        prompt,
        answer,
        output,
        task.grade(output, answer),
        latency,
        int(data["usage"]["completion_tokens"]),
        resp.headers.get("x-moerge-experts", ""),
        resp.headers.get("x-moerge-router", "none"),
        expected_expert,
    )


TOKEN_LEVEL_ROUTERS = frozenset({"arrow", "phatgoose", "glider"})
"""Routers that mix every adapter per token: the headers name all of them, so "routed to the task's expert"
says nothing there (the trace heatmap shows their choices instead)."""


def routing_accuracy(outcomes: Sequence[QueryOutcome]) -> float | None:
    """Share of a composition's queries whose answer came from (or included) their task's own expert."""
    judged = [o for o in outcomes if o.router != "none" and o.router not in TOKEN_LEVEL_ROUTERS and o.expected_expert]
    if not judged:
        return None
    return sum(o.expected_expert in o.experts.split(",") for o in judged) / len(judged)


async def evaluate_model(
    client: httpx.AsyncClient,
    model: str,
    tasks: Sequence[Task],
    *,
    n: int,
    split: str = "eval",
    concurrency: int = 16,
    on_done: Callable[[], None] | None = None,
    expert_for: dict[str, str] | None = None,
) -> EvalRow:
    gate = asyncio.Semaphore(concurrency)
    expert_for = expert_for or {}

    async def one(task: Task, prompt: str, answer: str) -> QueryOutcome:
        outcome = await _ask(client, model, task, prompt, answer, gate, expert_for.get(task.name, ""))
        if on_done:
            on_done()
        return outcome

    jobs = [one(task, ex.prompt, ex.answer) for task in tasks for ex in task.examples(split, n)]  # type: ignore[arg-type]
    start = time.perf_counter()
    outcomes = list(await asyncio.gather(*jobs))
    wall = time.perf_counter() - start
    accuracy = {task.name: sum(o.correct for o in outcomes if o.task == task.name) / max(1, n) for task in tasks}
    latencies = [o.latency_s * 1000 for o in outcomes]
    return EvalRow(
        model=model,
        accuracy=accuracy,
        mean=statistics.fmean(accuracy.values()) if accuracy else 0.0,
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        tokens_per_s=sum(o.completion_tokens for o in outcomes) / wall if wall > 0 else 0.0,
        n_per_task=n,
        queries=len(outcomes),
        wall_s=wall,
        outcomes=outcomes,
        routing_accuracy=1.0 if model == ORACLE else routing_accuracy(outcomes),
    )


async def evaluate(
    base_url: str,
    api_key: str | None,
    models: Sequence[str],
    *,
    task_names: Sequence[str] | None = None,
    n: int = 100,
    split: str = "eval",
    concurrency: int = 16,
    on_done: Callable[[], None] | None = None,
    expert_for: dict[str, str] | None = None,
) -> list[EvalRow]:
    tasks = [get_task(name) for name in task_names] if task_names else list(TASKS)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=900, limits=limits) as client:
        rows = []
        for model in models:  # one model at a time: its latencies are not mixed with another's
            rows.append(
                await evaluate_model(
                    client,
                    model,
                    tasks,
                    n=n,
                    split=split,
                    concurrency=concurrency,
                    on_done=on_done,
                    expert_for=expert_for,
                )
            )
        return rows


# -- reports -----------------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[EvalRow], *, title: str = "", concurrency: int = 16) -> str:
    tasks = list(rows[0].accuracy) if rows else []
    routed = any(r.routing_accuracy is not None for r in rows)
    head = ["model", *tasks, "mean", *(["routing"] if routed else []), "p50 ms", "p95 ms", "tokens/s"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row.model,
            *(f"{100 * row.accuracy[t]:.0f}%" for t in tasks),
            f"**{100 * row.mean:.1f}%**",
            *([_percent_or_dash(row.routing_accuracy)] if routed else []),
            f"{row.latency_p50_ms:.0f}",
            f"{row.latency_p95_ms:.0f}",
            f"{row.tokens_per_s:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += [
            "",
            f"Exact match on {rows[0].n_per_task} queries per task (greedy); latency per query at the "
            f"client with up to {concurrency} in flight; tokens/s = completion tokens / wall time of the model's run.",
        ]
        if routed:
            lines.append(
                "routing = share of a composition's queries answered by (or with) their task's own expert; "
                f"`{ORACLE}` sends every query to its task's expert."
            )
    return "\n".join(lines) + "\n"


def _percent_or_dash(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def plot(rows: Sequence[EvalRow], path: Path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [*list(rows[0].accuracy), "mean"] if rows else []
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks)), 4.5))
    for i, row in enumerate(rows):
        values = [100 * row.accuracy[t] for t in tasks[:-1]] + [100 * row.mean]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=row.model)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "moerge eval")
    ax.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(
    rows: Sequence[EvalRow], out_dir: Path, *, title: str = "", name: str = "eval", concurrency: int = 16
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{name}.md", "json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    paths["markdown"].write_text(markdown_table(rows, title=title, concurrency=concurrency))
    payload: dict[str, Any] = {
        "title": title,
        "rows": [{k: v for k, v in asdict(row).items() if k != "outcomes"} for row in rows],
        "outcomes": {row.model: [asdict(o) for o in row.outcomes] for row in rows},
    }
    paths["json"].write_text(json.dumps(payload, indent=1))
    plot(rows, paths["png"], title=title)
    return paths


async def fetch_trace(base_url: str, api_key: str | None, model: str, prompt: str) -> dict[str, Any] | None:
    """A token-level composition's trace of ``prompt`` (its per-token, per-layer adapter weights), or None
    when ``model`` routes per query (or is no composition)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, trust_env=False) as client:
        resp = await client.post("/api/route", json={"model": model, "messages": chat_messages(prompt), "trace": True})
    if resp.status_code in (400, 404):
        return None
    resp.raise_for_status()
    trace: dict[str, Any] = resp.json()["trace"]
    return trace


def plot_trace(trace: dict[str, Any], path: Path, *, title: str = "") -> None:
    """Heatmap of a trace: one row per layer, one column per token; the colour names the adapter with the
    largest mixing weight there, its strength that weight (white = spread evenly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    weights = np.asarray(trace["weights"], dtype=np.float32)  # [layers, tokens, experts]
    experts = list(trace["experts"])
    palette = plt.get_cmap("tab10" if len(experts) <= 10 else "tab20")
    colours = np.asarray([palette(i % palette.N)[:3] for i in range(len(experts))], dtype=np.float32)
    best = weights.argmax(-1)
    strength = weights.max(-1)
    floor = 1.0 / len(experts)  # an even spread shows as white
    alpha = np.clip((strength - floor) / max(1e-6, 1 - floor), 0, 1)[..., None]
    image = alpha * colours[best] + (1 - alpha) * np.ones(3, dtype=np.float32)
    tokens = [t.replace("\n", "\\n") or " " for t in trace["tokens"]]
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(tokens)), max(3, 0.22 * len(trace["layers"]) + 1.5)))
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(len(trace["layers"])), trace["layers"], fontsize=6)
    ax.set_ylabel("layer")
    ax.axvline(trace["prompt_tokens"] - 0.5, color="black", linewidth=0.8)  # prompt | answer
    ax.set_title(title or "token-level routing")
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(experts)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
