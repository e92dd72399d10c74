"""The demo's first run on a fresh machine, timed: from nothing (no .venv with --fresh-venv, an empty
MOERGE_HOME and MOERGE_CACHE) to the base model answering, and on to all six experts served, with the p50 of
a base-model query while the experts train in the background and once they are done.

Runs `bash scripts/demo.sh` in the given clone (the repository by default) on the default port, reads its
output line by line (each line timestamped), queries the base model through /v1 while the first experts train
(``--queries`` of them, one every ``--every-s`` seconds, 16 new tokens, greedy: spaced so training keeps most of
the CPU), then as many once every expert is served; stops the demo (SIGINT) and writes
bench/results/first_run.json and a section of bench/RESULTS.md.

    python bench/first_run.py [--repo DIR] [--fresh-venv] [--timeout-min 90]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402

BASE = "smollm2-135m-instruct"
SERVING = "moerge is serving"
ALL_SERVED = "every demo expert is trained and served"
BANNER = "moerge demo"


class Run:
    """The demo process and its timestamped output."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            ["bash", "scripts/demo.sh"],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip()))
            print(f"[{self.lines[-1][0]:7.1f} s] {line.rstrip()}", flush=True)

    def seen(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def wait_for(self, text: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while (found := self.seen(text)) is None:
            if self.proc.poll() is not None:
                raise SystemExit(f"the demo exited ({self.proc.returncode}) before {text!r}")
            if time.monotonic() > deadline:
                raise SystemExit(f"no {text!r} within {timeout_s:.0f} s")
            time.sleep(0.5)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def ask_base(client: httpx.Client) -> float:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16}
    start = time.perf_counter()
    resp = client.post("/v1/chat/completions", json={**body, "temperature": 0})
    resp.raise_for_status()
    return (time.perf_counter() - start) * 1000


def training_running(client: httpx.Client) -> bool:
    jobs = client.get("/api/jobs", params={"kind": "train", "limit": 50}).json()["data"]
    return any(j["status"] in ("queued", "running") for j in jobs)


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT)
    parser.add_argument("--fresh-venv", action="store_true", help="remove the clone's .venv first")
    parser.add_argument("--timeout-min", type=float, default=120)
    parser.add_argument("--queries", type=int, default=30, help="base-model queries during training, and after")
    parser.add_argument("--every-s", type=float, default=5.0, help="seconds between two of them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "first_run.json")
    args = parser.parse_args()
    if args.fresh_venv:
        shutil.rmtree(args.repo / ".venv", ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix="moerge-first-run-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
    env.update(MOERGE_HOME=str(scratch / "home"), MOERGE_CACHE=str(scratch / "cache"))
    run = Run(args.repo, env)
    during: list[float] = []
    after: list[float] = []
    try:
        setup_s = run.wait_for(BANNER, 1800)
        serving_s = run.wait_for(SERVING, 900)
        key = (scratch / "home" / "admin-key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url="http://127.0.0.1:8000", headers=headers, timeout=300) as client:
            # A sample of queries while the first expert trains, spaced so the training keeps most of the CPU
            while len(during) < args.queries and training_running(client) and run.seen(ALL_SERVED) is None:
                during.append(ask_base(client))
                time.sleep(args.every_s)
            all_served_s = run.wait_for(ALL_SERVED, args.timeout_min * 60)
            for _ in range(args.queries):
                after.append(ask_base(client))
                time.sleep(args.every_s)
    finally:
        run.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {
        "fresh_venv": args.fresh_venv,
        "setup_s": round(setup_s, 1),
        "first_answer_s": round(serving_s - setup_s, 1),
        "all_served_s": round(all_served_s - setup_s, 1),
        "base_p50_ms_while_training": p50(during),
        "base_p50_ms_after": p50(after),
        "queries_while_training": len(during),
    }
    print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "`bench/first_run.py`"
        + (" --fresh-venv" if args.fresh_venv else "")
        + ": `bash scripts/demo.sh` with an empty MOERGE_HOME and MOERGE_CACHE"
        + (" and no .venv (pip's cache warm)" if args.fresh_venv else "")
        + "; times from the demo's start (after the environment is ready) unless said.",
        "",
        "| step | time |",
        "|---|---|",
        f"| environment ready (scripts/setup.sh; from the start) | {result['setup_s']:.0f} s |",
        f"| base model answering, API and admin panel up (SmolLM2 converted, vLLM started) | "
        f"{result['first_answer_s']:.0f} s |",
        f"| all six experts trained in the background and served in `auto` | {result['all_served_s'] / 60:.1f} min |",
        "",
        f"Base-model query (16 new tokens, greedy, one at a time) p50: {result['base_p50_ms_while_training']} ms while"
        f" the experts train (nice 10, {result['queries_while_training']} queries, one every {args.every_s:g} s), "
        f"{result['base_p50_ms_after']} ms after ({args.queries} queries), in the same run.",
    ]
    write_section(ROOT / "bench" / "RESULTS.md", "First run: the demo serves first", "\n".join(lines))


if __name__ == "__main__":
    main()
