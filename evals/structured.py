"""Do structured outputs hold on the demo's real experts? Every answer asked for with a JSON Schema must parse and
validate, whatever the model, router or aggregator that wrote it.

For each named model (the base, the six experts, compositions: a vote, a synthesis, token-level and weighted
mixtures), eval-split prompts of the demo's tasks (``--per-task`` each) are sent through a running moerge's /v1 with
the official `openai` client, ``response_format`` = a JSON Schema of the answer (``{"answer": <string>}``,
strict), greedily, with ``max_tokens`` large enough that no answer is cut. Counted per model: answers, cut ones
(finish_reason ``length``), ones that parse, ones valid against the schema, and how often the ``answer`` field
is the task's exact answer (a JSON answer still has to be right). Also a `vote` over parsed objects keeps the
schema (its rows). Needs `moerge demo` running (MOERGE_URL, key from MOERGE_API_KEY or $MOERGE_HOME/admin-key);
not part of CI. Writes ``evals/results/demo/structured.{md,json}``.

    .venv/bin/python -m evals.structured smollm2-135m-instruct arithmetic-lora ... pair-vote arrow pair-weighted
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402
from evals.tasks import TASKS, chat_messages  # noqa: E402

OUT = ROOT / "evals" / "results" / "demo"
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 200}},
    "required": ["answer"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
# The schema caps the string at 200 characters, so a constrained answer ends within ~210 tokens even when a model
# repeats itself one character per token: no answer can be cut.
MAX_TOKENS = 256


def ask(client: openai.OpenAI, model: str, task: str, prompt: str, gold: str) -> dict[str, Any]:
    started = time.perf_counter()
    reply = client.chat.completions.create(  # type: ignore[call-overload]
        model=model, messages=chat_messages(prompt), response_format=FORMAT, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = reply.choices[0]
    text = choice.message.content or ""
    row: dict[str, Any] = {"task": task, "cut": choice.finish_reason == "length", "parsed": False, "valid": False}
    try:
        value = json.loads(text)
        row["parsed"] = True
        jsonschema.validate(value, ANSWER)
        row["valid"] = True
        task_obj = TASKS.get(task)
        row["right"] = task_obj.grade(str(value["answer"]), gold)
    except (ValueError, jsonschema.ValidationError):
        row["right"] = False
    row["latency_s"] = time.perf_counter() - started
    return row


def warm(client: openai.OpenAI, model: str, wait_s: float = 600) -> None:
    """Until ``model`` answers: a vLLM server (re)starting for it answers 503 meanwhile (30-60 s here)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            return
        except openai.InternalServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--per-task", type=int, default=10, help="eval-split prompts per demo task (6 tasks)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    settings = Settings.from_env()
    if not settings.api_key:
        raise SystemExit("no API key: set MOERGE_API_KEY or MOERGE_HOME (with its admin-key)")
    client = openai.OpenAI(base_url=f"{settings.api_url}/v1", api_key=settings.api_key, max_retries=2, timeout=600)
    cases = [(t.name, ex.prompt, ex.answer) for t in TASKS for ex in t.examples("eval", args.per_task)]
    results: dict[str, list[dict[str, Any]]] = {}
    with ThreadPoolExecutor(8) as pool:
        for model in args.models:
            warm(client, model)
            results[model] = list(pool.map(lambda case, m=model: ask(client, m, *case), cases))
            rows = results[model]
            print(f"{model}: {sum(r['valid'] for r in rows)}/{len(rows)} valid, {sum(r['cut'] for r in rows)} cut")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Structured outputs on the demo (json_schema, strict; {len(cases)} eval-split prompts, greedy, "
        f"max_tokens {MAX_TOKENS})",
        "",
        "| model | answers | cut | parse | valid against the schema | answer field right |",
        "|---|---|---|---|---|---|",
    ]
    for model, rows in results.items():
        n = len(rows)
        lines.append(
            f"| {model} | {n} | {sum(r['cut'] for r in rows)} | {sum(r['parsed'] for r in rows)} | "
            f"{sum(r['valid'] for r in rows)} | {sum(r['right'] for r in rows) / n:.0%} |"
        )
    (args.out / "structured.md").write_text("\n".join(lines) + "\n")
    print((args.out / "structured.md").read_text())
    if any(not r["valid"] for rows in results.values() for r in rows):
        raise SystemExit("some answers did not validate against the schema")


if __name__ == "__main__":
    main()
