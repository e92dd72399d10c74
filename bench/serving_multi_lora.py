"""Benchmark: 16 concurrent chat requests spread over 4 LoRA adapters of SmolLM2-135M-Instruct.

  (a) through moerge (API -> managed vLLM server, adapters loaded at runtime)
  (b) PEFT in process, switching the adapter per request (`set_adapter`, one request at a time)
  (c) straight to the same vLLM server

Two workloads: fixed-length answers (every request generates exactly max_tokens: `ignore_eos` on vLLM,
`min_new_tokens` on PEFT, the way vLLM's own serving benchmark measures throughput) and natural-length ones
(the model stops when it wants: most demo answers take 1-11 tokens, one runs to max_tokens, so a round is a
prefill of all 16 prompts and then mostly that one answer decoding alone).
Reports tokens/s and p50/p95 latency of each, moerge's added latency over (c) (same requests, one at a
time, interleaved), and writes bench/results/serving.json and a section of bench/RESULTS.md.

    .venv/bin/python bench/serving_multi_lora.py [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from evals.harness import percentile  # noqa: E402

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colours and one fruit.",
    "Explain what a list is in Python, briefly.",
    "Give a short greeting to a new colleague.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_adapters(base_dir: Path, out: Path, count: int) -> list[Path]:
    """``count`` seeded random rank-8 LoRAs on every projection of ``base_dir``, written under ``out`` (the
    benchmarks' stand-ins when the demo's trained experts are not cached: see :func:`demo_adapters`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(count):
        folder = out / f"adapter-{i}"
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # small random deltas: outputs change but stay fluent
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.02)
        peft_model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def demo_adapters(count: int) -> list[Path] | None:
    """The first ``count`` demo experts' folders when all of them are trained and cached, else None."""
    try:
        from evals.recipe import expert_dir
        from evals.tasks import TASKS
    except ImportError:
        return None
    from registry.convert import cached_smollm2

    folders = [expert_dir(task, cached_smollm2()) for task in list(TASKS)[:count]]
    return folders if all((f / ".complete").exists() for f in folders) else None


WORKLOADS = {"fixed": True, "natural": False}  # name -> every answer exactly max_tokens long


def requests_for(models: list[str], max_tokens: int, fixed: bool, n: int = 16) -> list[dict[str, Any]]:
    return [
        {
            "model": models[i % len(models)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[(i // len(models)) % len(PROMPTS)]}],
            **({"ignore_eos": True} if fixed else {}),
        }
        for i in range(n)
    ]


async def concurrent_round(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    async def one(body: dict[str, Any]) -> tuple[float, int]:
        start = time.perf_counter()
        resp = await client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return time.perf_counter() - start, int(resp.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    results = await asyncio.gather(*(one(b) for b in bodies))
    wall = time.perf_counter() - start
    latencies = [r[0] * 1000 for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "answer_tokens": sorted((r[1] for r in results), reverse=True),
        "tokens_per_s": tokens / wall,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
    }


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    best = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
    return {**best, "rounds": rounds}


async def sequential_overhead(
    moerge: httpx.AsyncClient,
    direct: httpx.AsyncClient,
    moerge_models: list[str],
    direct_models: list[str],
    repeats: int,
) -> dict[str, Any]:
    """Same one-token request, one at a time, alternating paths: the difference is moerge's own cost. Which
    path goes first alternates from pair to pair, so whatever the second request of a pair gains or loses
    (a warm cache, a server just woken) falls on both paths alike."""
    via_moerge: list[float] = []
    via_direct: list[float] = []
    for i in range(repeats):
        paths = [(moerge, moerge_models, via_moerge), (direct, direct_models, via_direct)]
        for client, model, sink in paths if i % 2 == 0 else paths[::-1]:
            body = {
                "model": model[i % len(model)],
                "max_tokens": 1,
                "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            }
            start = time.perf_counter()
            (await client.post("/v1/chat/completions", json=body)).raise_for_status()
            sink.append((time.perf_counter() - start) * 1000)
    return {
        "repeats": repeats,
        "moerge_p50_ms": percentile(via_moerge, 50),
        "direct_p50_ms": percentile(via_direct, 50),
        "moerge_p95_ms": percentile(via_moerge, 95),
        "direct_p95_ms": percentile(via_direct, 95),
        "overhead_p50_ms": percentile(via_moerge, 50) - percentile(via_direct, 50),
        "overhead_mean_ms": statistics.fmean(via_moerge) - statistics.fmean(via_direct),
        # the same prompt and adapter on both paths, back to back: the pair's difference, its median
        "paired_median_ms": statistics.median(m - d for m, d in zip(via_moerge, via_direct, strict=True)),
    }


class PeftSwitching:
    """(b): PEFT in process, `set_adapter` per request, requests one at a time (what adapter switching means).

    Loaded once; :meth:`round` runs one round. The rounds alternate with (a)'s and (c)'s (the vLLM server sits
    idle meanwhile), so a machine that drifts slower or faster during the benchmark affects every path alike."""

    def __init__(self, base_dir: Path, adapters: list[Path], names: list[str]) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(os.cpu_count() or 2)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, folder in zip(names[1:], adapters[1:], strict=True):
            self.model.load_adapter(folder, adapter_name=name)
        self.model.eval()

    def round(self, bodies: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        latencies, tokens = [], 0
        start = time.perf_counter()
        for body in bodies:  # all 16 arrive at once; each waits for the ones before it
            self.model.set_adapter(body["model"])
            encoded = self.tokenizer.apply_chat_template(
                body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            assert isinstance(encoded, Mapping)  # return_dict=True: input_ids and attention_mask
            ids: dict[str, torch.Tensor] = dict(encoded)
            fixed_length = body["max_tokens"] if body.get("ignore_eos") else 0
            with torch.no_grad():
                out = self.model.generate(
                    **ids,
                    max_new_tokens=body["max_tokens"],
                    min_new_tokens=fixed_length,
                    do_sample=False,
                    pad_token_id=self.tokenizer.eos_token_id,
                )
            tokens += int(out.shape[1] - ids["input_ids"].shape[1])
            latencies.append((time.perf_counter() - start) * 1000)
        wall = time.perf_counter() - start
        return {
            "wall_s": wall,
            "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--overhead-repeats", type=int, default=40)
    args = parser.parse_args()

    from registry.convert import cached_smollm2

    base_dir = cached_smollm2()
    work = Path(tempfile.mkdtemp(prefix="moerge-bench-"))
    adapters = demo_adapters(4) or make_adapters(base_dir, work / "adapters", 4)
    home = work / "home"
    port = free_port()
    env = {
        **os.environ,
        "MOERGE_HOME": str(home),
        "MOERGE_PORT": str(port),
        "MOERGE_ENGINE": "vllm",
        "MOERGE_ADMIN_KEY": "bench-admin-key-0123456789",
    }
    env.pop("MOERGE_DATABASE_URL", None)
    moerge = [str(ROOT / ".venv/bin/moerge")]
    subprocess.run([*moerge, "init"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*moerge, "expert", "add", str(base_dir), "--slug", "base"], env=env, check=True, capture_output=True
    )
    names = []
    for i, folder in enumerate(adapters):
        names.append(f"adapter-{i}")
        subprocess.run(
            [*moerge, "expert", "add", str(folder), "--slug", names[-1], "--base", "base"],
            env=env,
            check=True,
            capture_output=True,
        )
    log = (work / "serve.log").open("w")
    server = subprocess.Popen([*moerge, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    headers = {"authorization": f"Bearer {env['MOERGE_ADMIN_KEY']}"}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "adapters": len(adapters),
        "requests": 16,
        "max_tokens": args.max_tokens,
        "adapter_source": "demo experts" if demo_adapters(4) else "random rank-8 LoRAs",
        "lora_ops": env.get("MOERGE_VLLM_LORA_OPS", "grouped"),
        "vllm_model": "eager" if env.get("MOERGE_VLLM_COMPILE", "1") == "0" else "compiled",
    }
    peft = PeftSwitching(base_dir, adapters, names)
    try:
        asyncio.run(_run_all_paths(port, headers, names, peft, args, results))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    for part in results["workloads"].values():
        part["throughput_ratio_moerge_over_peft"] = (
            part["moerge_vllm"]["tokens_per_s"] / part["peft_switching"]["tokens_per_s"]
        )
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/serving.json").write_text(json.dumps(results, indent=1))
    o = results["overhead"]
    lines = [
        f"16 concurrent chat requests over {len(adapters)} LoRA adapters ({results['adapter_source']}) of "
        f"SmolLM2-135M-Instruct, greedy, max_tokens={args.max_tokens}, float32, {results['machine']}; "
        f"median of {args.rounds} rounds per path, the paths taking turns; vLLM's multi-LoRA ops: "
        f"{results['lora_ops']}, its model {results['vllm_model']} (MOERGE_VLLM_COMPILE).",
        "",
        "| workload | path | tokens/s | p50 latency ms | p95 latency ms |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for workload, part in results["workloads"].items():
        label = f"{workload} ({'every answer ' + str(args.max_tokens) + ' tokens' if WORKLOADS[workload] else 'EOS'})"
        lines += [
            _row(label, "(a) moerge -> vLLM (multi-LoRA batch)", part["moerge_vllm"]),
            _row(label, "(b) PEFT in process, set_adapter per request", part["peft_switching"]),
            _row(label, "(c) vLLM direct", part["vllm_direct"]),
        ]
    lines.append("")
    for workload, part in results["workloads"].items():
        a, c = part["moerge_vllm"], part["vllm_direct"]
        lines.append(
            f"- {workload}: throughput (a)/(b) **{part['throughput_ratio_moerge_over_peft']:.1f}x** (target >= 3x); "
            f"{a['tokens'] // 16} tokens per answer on average, the longest {a['answer_tokens'][0]} (then "
            f"{', '.join(map(str, a['answer_tokens'][1:4]))}); (a) took {a['wall_s']:.2f} s; "
            f"concurrent p50 (a) - (c) = {a['p50_ms'] - c['p50_ms']:+.0f} ms."
        )
    lines.append(
        f"- moerge's added latency over vLLM direct, same one-token request one at a time ({o['repeats']} each, "
        f"interleaved): p50 {o['moerge_p50_ms']:.1f} ms vs {o['direct_p50_ms']:.1f} ms = "
        f"**{o['overhead_p50_ms']:+.1f} ms** (target <= 5 ms); mean {o['overhead_mean_ms']:+.1f} ms; median of the "
        f"pairs' differences {o['paired_median_ms']:+.1f} ms (which path goes first alternates)."
    )
    table = "\n".join(lines)
    write_section(ROOT / "bench/RESULTS.md", "serving: multi-LoRA through moerge vs PEFT vs vLLM", table)
    print(table)


def _row(workload: str, label: str, r: dict[str, Any]) -> str:
    return f"| {workload} | {label} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |"


async def _run_all_paths(
    port: int,
    headers: dict[str, str],
    names: list[str],
    peft: PeftSwitching,
    args: argparse.Namespace,
    results: dict[str, Any],
) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=900, limits=limits
    ) as client:
        deadline = time.time() + 900
        while True:  # the API comes up, then vLLM starts on the first request
            try:
                resp = await client.post(
                    "/v1/chat/completions",
                    json={"model": names[0], "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                )
                if resp.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise SystemExit("moerge/vLLM did not come up; see the serve log")
            await asyncio.sleep(2)
        for name in names:  # load every adapter before timing
            (
                await client.post(
                    "/v1/chat/completions",
                    json={"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                )
            ).raise_for_status()
        engines = (await client.get("/api/engines")).json()["servers"]
        server = next(s for s in engines if s.get("url"))
        experts = {e["slug"]: e["id"] for e in (await client.get("/api/experts")).json()["data"]}
        direct_names = [experts[n] for n in names]  # vLLM knows adapters by registry id
        async with httpx.AsyncClient(base_url=server["url"], timeout=900, limits=limits) as direct:
            results["workloads"] = {}
            for workload, fixed in WORKLOADS.items():
                bodies = requests_for(names, args.max_tokens, fixed)
                direct_bodies = requests_for(direct_names, args.max_tokens, fixed)
                a_rounds, b_rounds, c_rounds = [], [], []
                for _ in range(args.rounds):  # alternate so drift affects every path alike
                    a_rounds.append(await concurrent_round(client, bodies))
                    c_rounds.append(await concurrent_round(direct, direct_bodies))
                    b_rounds.append(peft.round(bodies))  # in this process; the vLLM server is idle
                results["workloads"][workload] = {
                    "moerge_vllm": median_round(a_rounds),
                    "peft_switching": median_round(b_rounds),
                    "vllm_direct": median_round(c_rounds),
                }
            results["overhead"] = await sequential_overhead(client, direct, names, direct_names, args.overhead_repeats)


if __name__ == "__main__":
    main()
