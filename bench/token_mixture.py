"""Benchmark: the cost of a token-level LoRA mixture (``arrow``, top-2) on SmolLM2-135M-Instruct.

N synthetic rank-8 LoRA adapters on all seven projections (q, k, v, o, gate, up, down, like the demo experts;
A and B drawn at the scale trained demo experts have) are written as PEFT adapter folders in a temp dir, so
moerge's loader and PEFT's ``create_arrow_model`` read the same files. Measured, float32, no grad:

(a) forward cost per token: a decode step (one new token per sequence on a KV cache of the prompt, batch 1
    and batch 16) and a 128-token prefill (batch 1), for the base alone, one LoRA (PEFT, unmerged), moerge's
    arrow mixture top-2 among 4/8/16/32 and PEFT's Arrow (``create_arrow_model``, top_k=2) among 4/8/16/32.
    All models stay loaded and the measurements interleave across them, round after round; medians.
(b) generation tokens/s (``model.generate``, greedy, exactly --new-tokens new tokens), batch 1 and 16, the
    mixture top-2 among 4 and 32 vs the single adapter (and the base).

Writes bench/results/token_mixture.json and a section of bench/RESULTS.md.

    PYTHONPATH=. .venv/bin/python bench/token_mixture.py [--rounds 5] [--sizes 4,8,16,32]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402

BASE_DIR = Path.home() / ".cache" / "moerge" / "SmolLM2-135M-Instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
RANK, ALPHA = 8, 16
B_STD = 0.013  # std of lora_B in the trained demo experts (lora_A keeps PEFT's kaiming-uniform init scale)
SECTION = "Token-level mixture cost (arrow, SmolLM2-135M)"
PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colours and one fruit.",
    "Explain what a list is in Python, briefly.",
    "Give a short greeting to a new colleague.",
    "What is 12 plus 30?",
    "Sort these numbers: 5, 3, 9, 1.",
    "Convert 3 km to metres.",
    "Is this review positive or negative: 'I loved it'?",
]


def load_text() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def build_adapters(out: Path, count: int, config: Any) -> list[Path]:
    """``count`` seeded random rank-8 LoRA folders for the base of ``config`` (a transformers config)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = {  # module -> (in, out)
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    lora_config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(BASE_DIR),
    )
    folders = []
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(config.num_hidden_layers):
            for module, (d_in, d_out) in shapes.items():
                key = f"{PEFT_PREFIX}model.layers.{layer}.{module}"
                bound = 1.0 / d_in**0.5
                tensors[f"{key}.lora_A.weight"] = (torch.rand(RANK, d_in, generator=gen) * 2 - 1) * bound
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, RANK, generator=gen) * B_STD
        folder = out / f"synthetic-{i:02d}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        lora_config.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def load_base() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32).eval()


def build_models(adapters: list[Path], sizes: list[int]) -> dict[str, nn.Module]:
    from peft import ArrowConfig as PeftArrowConfig
    from peft import PeftModel, create_arrow_model

    from routers.token import TOKEN_ROUTERS, load_mixture_model

    models: dict[str, nn.Module] = {"base": load_base()}
    models["one LoRA (PEFT)"] = PeftModel.from_pretrained(load_base(), str(adapters[0])).eval()
    for n in sizes:
        t0 = time.perf_counter()
        router = TOKEN_ROUTERS.build("arrow", {"top_k": 2})
        model, _ = load_mixture_model(BASE_DIR, adapters[:n], router)
        models[f"moerge arrow top-2 of {n}"] = model
        print(f"  moerge mixture of {n}: loaded and fitted in {time.perf_counter() - t0:.1f} s", flush=True)
    for n in sizes:
        t0 = time.perf_counter()
        cfg = PeftArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)
        peft_arrow = create_arrow_model(load_base(), [str(p) for p in adapters[:n]], cfg).eval()
        models[f"PEFT Arrow top-2 of {n}"] = peft_arrow
        print(f"  PEFT Arrow of {n}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return models


def prompt_ids(batch: int, length: int, seed: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=gen)


class DecodeStep:
    """One decode step (one new token per sequence) on a KV cache of a ``context``-token prompt; the cache
    is cropped back after every step so each step sees the same context."""

    def __init__(self, model: nn.Module, batch: int, context: int, vocab: int) -> None:
        self.model = model
        ids = prompt_ids(batch, context, seed=batch, vocab=vocab)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        self.cache = out.past_key_values
        self.context = context
        self.next_ids = prompt_ids(batch, 1, seed=batch + 7, vocab=vocab)

    def __call__(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True)
        self.cache.crop(-1)


def time_call(fn: Callable[[], None], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_forward(
    models: dict[str, nn.Module], rounds: int, context: int, prefill: int, vocab: int
) -> dict[str, dict[str, float]]:
    """Median ms per token of each (model, workload), interleaving the models within every round."""
    workloads = {"decode b1": (1, 12), "decode b16": (16, 6), f"prefill {prefill}": (1, 3)}
    per_token: dict[str, dict[str, list[float]]] = {name: {w: [] for w in workloads} for name in models}
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for name, model in models.items():
        for w, (batch, _) in workloads.items():
            if w.startswith("decode"):
                steps[name, w] = DecodeStep(model, batch, context, vocab)
            else:
                ids = prompt_ids(1, prefill, seed=3, vocab=vocab)

                def run(model: nn.Module = model, ids: torch.Tensor = ids) -> None:
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False)

                steps[name, w] = run
            steps[name, w]()  # warm-up (PEFT's Arrow builds its prototypes on the first call)
        print(f"  {name}: warmed up (load {load_text()})", flush=True)
    for r in range(rounds):
        for w, (batch, repeat) in workloads.items():
            tokens = batch if w.startswith("decode") else prefill
            for name in models:
                times = time_call(steps[name, w], repeat)
                per_token[name][w].append(statistics.median(times) / tokens * 1000)
        print(f"  forward round {r + 1}/{rounds} done (load {load_text()})", flush=True)
    return {name: {w: statistics.median(v) for w, v in ws.items()} for name, ws in per_token.items()}


def chat_batch(tokenizer: Any, batch: int) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(batch)
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def measure_generation(
    models: dict[str, nn.Module], rounds: int, new_tokens: int, batches: list[int]
) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BASE_DIR))
    inputs = {b: chat_batch(tokenizer, b) for b in batches}
    rates: dict[str, dict[str, list[float]]] = {name: {f"batch {b}": [] for b in batches} for name in models}

    def generate(model: nn.Module, b: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                **inputs[b],
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - t0
        assert out.shape[1] - inputs[b]["input_ids"].shape[1] == new_tokens
        return b * new_tokens / elapsed

    for model in models.values():  # warm-up
        generate(model, batches[0])
    for r in range(rounds):
        for b in batches:
            for name, model in models.items():
                rates[name][f"batch {b}"].append(generate(model, b))
        print(f"  generation round {r + 1}/{rounds} done (load {load_text()})", flush=True)
    return {name: {k: statistics.median(v) for k, v in ks.items()} for name, ks in rates.items()}


def fmt(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the forward measurements")
    parser.add_argument("--gen-rounds", type=int, default=3, help="rounds of the generation measurements")
    parser.add_argument("--sizes", default="4,8,16,32", help="numbers of adapters in the mixture")
    parser.add_argument("--context", type=int, default=32, help="KV-cache length of the decode steps")
    parser.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per sequence in generate")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, one per core)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "token_mixture.json")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results and RESULTS.md alone")
    parser.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from --out")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(args.out.read_text())
        write_section(ROOT / "bench" / "RESULTS.md", SECTION, report(results))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_text()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load_before}", flush=True)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(BASE_DIR))
    with tempfile.TemporaryDirectory(prefix="token-mixture-bench-") as tmp:
        t0 = time.perf_counter()
        adapters = build_adapters(Path(tmp), max(sizes), config)
        print(f"built {len(adapters)} synthetic adapters in {time.perf_counter() - t0:.1f} s", flush=True)
        models = build_models(adapters, sizes)
        forward = measure_forward(models, args.rounds, args.context, args.prefill, config.vocab_size)
        # Written now and again after generation, so the forward figures survive a cut-short run.
        finish(args, sizes, forward, {}, load_before)
        generation: dict[str, dict[str, float]] = {}
        if not args.skip_generation:
            gen_names = ["base", "one LoRA (PEFT)"] + [
                f"moerge arrow top-2 of {n}" for n in (min(sizes), max(sizes)) if f"moerge arrow top-2 of {n}" in models
            ]
            gen_models = {n: models[n] for n in dict.fromkeys(gen_names)}
            generation = measure_generation(gen_models, args.gen_rounds, args.new_tokens, [1, 16])
            finish(args, sizes, forward, generation, load_before)
        del models
        gc.collect()


def finish(
    args: argparse.Namespace,
    sizes: list[int],
    forward: dict[str, dict[str, float]],
    generation: dict[str, dict[str, float]],
    load_before: str,
) -> None:
    workloads = list(next(iter(forward.values())))
    print("\nforward, ms per token (median):")
    print(f"{'model':32s}" + "".join(f"{w:>14s}" for w in workloads))
    for name, ws in forward.items():
        print(f"{name:32s}" + "".join(f"{fmt(ws[w]):>14s}" for w in workloads))
    if generation:
        print("\ngeneration, tokens/s (median):")
        for name, ks in generation.items():
            print(f"{name:32s}" + "".join(f"{k}: {fmt(v):>8s}   " for k, v in ks.items()))

    one = forward["one LoRA (PEFT)"]
    base = forward["base"]
    targets: dict[str, Any] = {}
    n_max = max(sizes)
    ours_max = forward[f"moerge arrow top-2 of {n_max}"]
    ratio = {w: ours_max[w] / one[w] for w in workloads}
    delta_ratio = {w: (ours_max[w] - base[w]) / (one[w] - base[w]) for w in workloads}
    targets[f"at most 1.5x one LoRA at {n_max} adapters"] = {
        "ratio": {w: round(v, 3) for w, v in ratio.items()},
        "added_over_base_ratio": {w: round(v, 2) for w, v in delta_ratio.items()},
        "met": all(v <= 1.5 for v in ratio.values()),
    }
    faster = {
        f"{n} {w}": forward[f"moerge arrow top-2 of {n}"][w] < forward[f"PEFT Arrow top-2 of {n}"][w]
        for n in sizes
        for w in workloads
    }
    targets["faster than PEFT's Arrow at every size"] = {"per_case": faster, "met": all(faster.values())}
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32",
        "load_before": load_before,
        "load_after": load_text(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "forward_ms_per_token": {n: {w: round(v, 4) for w, v in ws.items()} for n, ws in forward.items()},
        "generation_tokens_per_s": {n: {k: round(v, 2) for k, v in ks.items()} for n, ks in generation.items()},
        "targets": targets,
    }
    print(json.dumps(targets, indent=1), flush=True)
    if args.no_write:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    write_section(ROOT / "bench" / "RESULTS.md", SECTION, report(results))


def report(results: dict[str, Any]) -> str:
    fwd: dict[str, dict[str, float]] = results["forward_ms_per_token"]
    gen: dict[str, dict[str, float]] = results["generation_tokens_per_s"]
    p = results["params"]
    workloads = list(next(iter(fwd.values())))
    lines = [
        f"`bench/token_mixture.py`: synthetic rank-8 LoRAs (alpha 16) on all seven projections of "
        f"SmolLM2-135M-Instruct, float32, no grad; {results['machine']}. Decode = one new token per sequence "
        f"on a {p['context']}-token KV cache; prefill = {p['prefill']} tokens, batch 1. All models loaded at "
        f"once, measured interleaved, median of {p['rounds']} rounds. Load average (1/5/15 min) before "
        f"{results['load_before']}, after {results['load_after']} (other engineers share the machine).",
        "",
        "Forward cost, ms per token:",
        "",
        "| model | " + " | ".join(workloads) + " |",
        "|---|" + "---:|" * len(workloads),
    ]
    for name, ws in fwd.items():
        lines.append(f"| {name} | " + " | ".join(fmt(ws[w]) for w in workloads) + " |")
    if gen:
        keys = list(next(iter(gen.values())))
        lines += [
            "",
            f"Generation (`model.generate`, greedy, exactly {p['new_tokens']} new tokens per sequence, chat "
            f"prompts, left padding), tokens/s, median of {p['gen_rounds']} rounds:",
            "",
            "| model | " + " | ".join(keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for name, ks in gen.items():
            lines.append(f"| {name} | " + " | ".join(fmt(ks[k]) for k in keys) + " |")
    t = results["targets"]
    small_key = next(key for key in t if key.startswith("at most 1.5x"))
    small = t[small_key]
    fast = t["faster than PEFT's Arrow at every size"]
    lines += [
        "",
        "Targets (issue 7):",
        "",
        f"- top-2 among {small_key.removeprefix('at most 1.5x one LoRA at ')} at most 1.5x the forward cost of "
        "one LoRA: "
        + ", ".join(f"{w} {v:.2f}x" for w, v in small["ratio"].items())
        + f" -> **{'met' if small['met'] else 'not met'}**. Counting only what each adds over the base: "
        + ", ".join(
            f"{w} {v:.1f}x" if v > 0 else f"{w} n/a (the one LoRA measured no slower than the base: noise)"
            for w, v in small["added_over_base_ratio"].items()
        )
        + " the one LoRA's addition.",
        f"- faster than PEFT's Arrow at every size: **{'met' if fast['met'] else 'not met'}**"
        + ("" if fast["met"] else " (slower in: " + ", ".join(k for k, ok in fast["per_case"].items() if not ok) + ")")
        + ".",
    ]
    single = gen.get("one LoRA (PEFT)")
    if single:
        for name, ks in gen.items():
            if name.startswith("moerge"):
                lines.append(
                    f"- generation, {name} vs the single adapter (no threshold in the issue): "
                    + ", ".join(f"{k} {v / single[k]:.2f}x" for k, v in ks.items())
                    + " the single adapter's tokens/s."
                )
    lines += [
        "",
        "How moerge's mixture runs (serving/mixture/layer.py, sparse.py): modules that read one input (q/k/v; "
        "gate/up) are routed together, one score matmul over their concatenated prototypes and one top-k, each "
        "module keeping its own route; their A sides run as one gather of the chosen (token, expert) pairs' A "
        "and one batched matmul (above 32 tokens: pairs sorted by expert, one grouped matmul, torch._grouped_mm); "
        "each module adds "
        "its B side into the base output in place. Only chosen experts are computed. PEFT's Arrow computes every "
        "expert on every token (and re-stacks the adapters at every call).",
        "",
        f"Noise: with {p['rounds']} rounds on a shared machine (see the load above), figures move by up to "
        "~20% between runs (the mixtures of 4 to 32 do the same work per token at decode, yet differ by that "
        "much here); read ratios near a threshold with that in mind.",
        "",
        "Threads: with torch's default 2 threads on this shared machine, `torch.softmax` enters an OpenMP "
        "parallel region even for 2 values and took ~8 ms a call under load (2 us with 1 thread); moerge's "
        "router no longer calls it, PEFT's Arrow calls it once per module per forward, which made a 2-thread "
        "run too slow to finish (PEFT's Arrow at seconds per decode step). When `threads` above reads 1, every "
        "model ran single-threaded (`--threads 1`), which removes that effect for all of them.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
