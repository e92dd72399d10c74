"""Benchmark: one vLLM decode step with and without a LoRA adapter, moerge's CPU LoRA ops vs vLLM's own, in
vLLM's compiled model (serving/vllm_compile.py) and eager (how vLLM itself runs LoRA on CPU).

vLLM runs in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor) so nothing else competes for
the two cores. For each variant (``MOERGE_VLLM_LORA_OPS``: ``grouped`` = serving/lora_ops.py, ``vllm`` = vLLM's
own; ``MOERGE_VLLM_COMPILE``; each in a fresh process, since the plugin patches vLLM once per process; a
compiled variant's first run also compiles, which the warm-up absorbs) and batch size, a step is timed
as (time of 65 forced tokens - time of 1) / 64, base model and one adapter (the demo's dates expert when
trained, else a seeded random rank-8 LoRA) interleaved, median of the rounds. Writes bench/results/vllm_lora_step.json
and a section of bench/RESULTS.md.

    .venv/bin/python bench/vllm_lora_step.py [--rounds 5] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from bench.serving_multi_lora import make_adapters  # noqa: E402
from serving.vllm_process import server_env  # noqa: E402

# label -> (MOERGE_VLLM_LORA_OPS, MOERGE_VLLM_COMPILE)
VARIANTS = {"grouped, compiled": ("grouped", "1"), "grouped, eager": ("grouped", "0"), "vllm, eager": ("vllm", "0")}
PROMPT: list[Any] = [{"role": "user", "content": "Rewrite the date 3 March 2021 in ISO format."}]


def measure(base_dir: str, adapter_dir: str, rounds: int, batches: list[int]) -> dict[str, Any]:
    """Runs inside a child process whose environment selects the op set."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=base_dir,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=8,
        dtype="float32",
        max_model_len=2048,
        distributed_executor_backend="uni",
    )
    lora = LoRARequest("expert", 1, adapter_dir)

    def timed(tokens: int, batch: int, request: LoRARequest | None) -> float:
        sampling = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
        start = time.perf_counter()
        llm.chat([PROMPT] * batch, sampling, lora_request=request, use_tqdm=False)
        return time.perf_counter() - start

    out: dict[str, Any] = {}
    for batch in batches:
        for request in (None, lora, None, lora):  # warm both paths at this batch size
            timed(2, batch, request)
        steps: dict[str, list[float]] = {"base": [], "lora": []}
        for _ in range(rounds):
            for name, request in (("base", None), ("lora", lora)):
                one = timed(1, batch, request)
                steps[name].append((timed(65, batch, request) - one) / 64 * 1000)
        out[str(batch)] = {name: statistics.median(v) for name, v in steps.items()} | {"runs": steps}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--child", nargs=2, metavar=("BASE", "ADAPTER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.rounds, args.batches)))
        return

    from evals.recipe import expert_dir
    from evals.tasks import get_task
    from registry.convert import cached_smollm2

    base_dir = cached_smollm2()
    adapter = expert_dir(get_task("dates"), base_dir)
    source = "the demo's dates expert"
    if not (adapter / ".complete").exists():
        [adapter] = make_adapters(base_dir, Path(tempfile.mkdtemp(prefix="moerge-step-")), 1)
        source = "a seeded random rank-8 LoRA"
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "adapter": source}
    for label, (ops, compiled) in VARIANTS.items():
        env = {
            **server_env(2),  # as managed servers run
            "MOERGE_VLLM_LORA_OPS": ops,
            "MOERGE_VLLM_COMPILE": compiled,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
        command = [sys.executable, __file__, "--child", str(base_dir), str(adapter), "--rounds", str(args.rounds)]
        command += ["--batches", *map(str, args.batches)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the {label} run failed:\n{done.stderr[-3000:]}")
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/vllm_lora_step.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"`bench/vllm_lora_step.py`: one decode step of SmolLM2-135M-Instruct in vLLM (in process, float32, "
        f"{results['machine']}), base model vs one adapter ({source}), forced tokens, median of {args.rounds} rounds; "
        "`grouped` = moerge's CPU LoRA ops (serving/lora_ops.py: a packed LoRA layer as two products), `vllm` = "
        "vLLM's own; `compiled` = vLLM's torch.compile'd model with each LoRA layer's adapter work as one opaque op "
        "(serving/vllm_compile.py; with grouped ops the op applies a plan kept per layer until the batch's adapter "
        "mapping changes; vLLM itself runs eager on CPU whenever LoRA is enabled).",
        "",
        "| LoRA ops, model | batch | base ms/step | with the adapter ms/step | LoRA adds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label in VARIANTS:
        for batch, row in results[label].items():
            lines.append(
                f"| {label} | {batch} | {row['base']:.1f} | {row['lora']:.1f} | "
                f"{row['lora'] - row['base']:+.1f} ms ({row['lora'] / row['base'] - 1:+.0%}) |"
            )
    body = "\n".join(lines)
    print(body)
    write_section(ROOT / "bench/RESULTS.md", "vLLM decode step with LoRA (moerge's ops vs vLLM's)", body)


if __name__ == "__main__":
    main()
