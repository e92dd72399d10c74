"""The eval harness's arithmetic and reports (the serving path itself is exercised in integration tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.results import write_section
from evals.harness import EvalRow, QueryOutcome, markdown_table, percentile, routing_accuracy, write_reports


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 95) == 10
    assert percentile([1, 2, 3, 4, 5], 0) == 1 and percentile([1, 2, 3, 4, 5], 100) == 5
    assert percentile([3, 1, 2], 50) == 2


def row(model: str, acc: dict[str, float]) -> EvalRow:
    outcome = QueryOutcome("dates", "p", "a", "a", True, 0.1, 3, model)
    return EvalRow(model, acc, sum(acc.values()) / len(acc), 100.0, 150.0, 42.0, 10, 20, 1.0, [outcome])


def test_reports_written(tmp_path: Path) -> None:
    rows = [row("base", {"dates": 0.1, "units": 0.0}), row("dates-lora", {"dates": 1.0, "units": 0.2})]
    paths = write_reports(rows, tmp_path / "out", title="demo")
    table = paths["markdown"].read_text()
    assert "| dates-lora | 100% | 20% | **60.0%** | 100 | 150 | 42.0 |" in table
    data = json.loads(paths["json"].read_text())
    assert data["rows"][1]["accuracy"] == {"dates": 1.0, "units": 0.2}
    assert data["outcomes"]["base"][0]["experts"] == "base"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table([]).strip() == "| model | mean | p50 ms | p95 ms | tokens/s |\n|---|---|---|---|---|"


def test_results_sections_replace_themselves(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section(path, "one", "first")
    write_section(path, "two", "second")
    write_section(path, "one", "again")
    text = path.read_text()
    assert text.count("## one") == 1 and "again" in text and "first" not in text and "second" in text
    assert text.index("## one") < text.index("## two")


@pytest.mark.parametrize("split", ["eval", "heldout"])
def test_every_task_has_gradable_examples(split: str) -> None:
    from evals.tasks import TASKS

    for task in TASKS:
        examples = task.examples(split, 5)
        assert len(examples) == 5 and all(task.grade(e.answer, e.answer) for e in examples)


def test_routing_accuracy_counts_only_composition_queries() -> None:
    def outcome(experts: str, router: str, expected: str) -> QueryOutcome:
        return QueryOutcome("dates", "p", "a", "a", True, 0.1, 3, experts, router, expected)

    assert routing_accuracy([outcome("dates-lora", "none", "dates-lora")]) is None  # a plain model
    mixed = [
        outcome("dates-lora", "embedding", "dates-lora"),
        outcome("units-lora", "embedding", "dates-lora"),
        outcome("units-lora,dates-lora", "embedding", "dates-lora"),  # k = 2 with the right one in it
        outcome("units-lora", "embedding", ""),  # task without a known expert: not judged
    ]
    assert routing_accuracy(mixed) == 2 / 3
    routed = row("auto", {"dates": 1.0})
    routed.routing_accuracy = 2 / 3
    table = markdown_table([row("base", {"dates": 0.5}), routed])
    assert "| model | dates | mean | routing |" in table
    assert "| auto | 100% | **100.0%** | 66.7% |" in table and "| base | 50% | **50.0%** | – |" in table


async def test_a_query_comes_back_after_503_as_told(unused_tcp_port: int) -> None:
    """A server that is (re)starting answers 503 + Retry-After: the harness waits and asks again."""
    import asyncio

    import httpx
    from aiohttp import web

    from evals.harness import _ask
    from evals.tasks import get_task

    calls: list[float] = []

    async def chat(_request: web.Request) -> web.Response:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) < 3:
            return web.json_response({"error": {"message": "starting"}}, status=503, headers={"retry-after": "1"})
        body = {"choices": [{"message": {"content": "42"}}], "usage": {"completion_tokens": 1}}
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{unused_tcp_port}") as client:
            outcome = await _ask(client, "m", get_task("arithmetic"), "1+41?", "42", asyncio.Semaphore(1))
    finally:
        await runner.cleanup()
    assert len(calls) == 3 and outcome.output == "42" and outcome.correct
    assert calls[2] - calls[0] >= 1.9  # it waited the Retry-After each time
