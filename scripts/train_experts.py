"""Train (or reuse) one LoRA expert per skill task on SmolLM2-135M-Instruct and check each quickly.

For every task: train with the recipe (cached by digest), then greedy-decode the task's eval split
with the base and with the expert in process (transformers + PEFT) and grade exact match. Prints a
table, writes it to evals/results/train_check.json, and exits 1 if an expert scores below
--min-acc on its own task or beats the base there by less than --min-margin.

    .venv/bin/python scripts/train_experts.py                 # all tasks
    .venv/bin/python scripts/train_experts.py --tasks dates units --n 60
    .venv/bin/python scripts/train_experts.py --cross          # also every expert on every task
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from evals.recipe import LoraRecipe, default_out_root, expert_dir, is_complete, train_expert  # noqa: E402
from evals.tasks import TASKS, Example, Task, chat_messages  # noqa: E402

RESULTS = ROOT / "evals" / "results" / "train_check.json"
EVAL_BATCH = 16


def _parse() -> argparse.Namespace:
    defaults = LoraRecipe()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS.names(), default=TASKS.names(), help="tasks to train")
    p.add_argument("--base", type=Path, help="base model folder (default: the cached SmolLM2 conversion)")
    p.add_argument("--out-root", type=Path, default=None, help=f"expert cache (default: {default_out_root()})")
    p.add_argument("--n", type=int, default=100, help="eval split size per task")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps per expert")
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cross", action="store_true", help="also evaluate every expert on every task")
    p.add_argument("--min-acc", type=float, default=0.8, help="an expert's least accuracy on its own task")
    p.add_argument("--min-margin", type=float, default=0.4, help="an expert's least gain over the base")
    p.add_argument("--output", type=Path, default=RESULTS, help="where the JSON table goes")
    return p.parse_args()


def _generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, batched with left padding so every row's last token is its prompt's."""
    import torch

    outs: list[str] = []
    for i in range(0, len(prompts), EVAL_BATCH):
        texts = [
            tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=False)
            for p in prompts[i : i + EVAL_BATCH]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outs


def _score(model: Any, tokenizer: Any, task: Task, examples: list[Example]) -> dict[str, Any]:
    started = time.perf_counter()
    outputs = _generate(model, tokenizer, [ex.prompt for ex in examples], task.max_new_tokens)
    right = [task.grade(out, ex.answer) for out, ex in zip(outputs, examples, strict=True)]
    wrong = [
        {"prompt": ex.prompt, "answer": ex.answer, "output": out}
        for out, ex, ok in zip(outputs, examples, right, strict=True)
        if not ok
    ]
    return {
        "accuracy": sum(right) / len(right),
        "seconds": round(time.perf_counter() - started, 1),
        "wrong_samples": wrong[:3],  # enough to see what goes wrong without bloating the file
    }


def main() -> int:
    args = _parse()
    logging.basicConfig(level=logging.WARNING)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.base is None:
        from registry.convert import cached_smollm2

        args.base = cached_smollm2()
    recipe = LoraRecipe(steps=args.steps, learning_rate=args.lr)
    tasks = [TASKS.get(name) for name in args.tasks]

    experts: dict[str, dict[str, Any]] = {}
    for task in tasks:
        reused = is_complete(expert_dir(task, args.base, args.out_root, recipe))

        def progress(step: int, total: int, loss: float, name: str = task.name) -> None:
            if step == 1 or step % 10 == 0 or step == total:
                print(f"  [{name}] step {step}/{total} loss {loss:.4f}", flush=True)

        print(f"{'reusing' if reused else 'training'} {task.name} expert", flush=True)
        path = train_expert(task, args.base, args.out_root, recipe, num_threads=args.threads, on_step=progress)
        info = json.loads((path / "recipe.json").read_text())
        experts[task.name] = {
            "path": str(path),
            "digest": info["digest"],
            "reused": reused,
            "train_seconds": info["train_seconds"],
            "final_train_loss": round(info["final_train_loss"], 4),
        }
        print(f"  -> {path} ({info['train_seconds']:.0f} s, final loss {info['final_train_loss']:.4f})", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, experts[tasks[0].name]["path"], adapter_name=tasks[0].name)
    for task in tasks[1:]:
        model.load_adapter(experts[task.name]["path"], adapter_name=task.name)
    model.eval()

    eval_sets = {task.name: task.examples("eval", args.n) for task in tasks}
    rows: dict[str, dict[str, Any]] = {}
    cross: dict[str, dict[str, float]] = {}
    for task in tasks:
        with model.disable_adapter():
            base_score = _score(model, tokenizer, task, eval_sets[task.name])
        model.set_adapter(task.name)
        expert_score = _score(model, tokenizer, task, eval_sets[task.name])
        margin = expert_score["accuracy"] - base_score["accuracy"]
        ok = expert_score["accuracy"] >= args.min_acc and margin >= args.min_margin
        rows[task.name] = {
            **experts[task.name],
            "base_accuracy": base_score["accuracy"],
            "expert_accuracy": expert_score["accuracy"],
            "margin": round(margin, 4),
            "passed": ok,
            "base_eval_seconds": base_score["seconds"],
            "expert_eval_seconds": expert_score["seconds"],
            "base_wrong_samples": base_score["wrong_samples"],
            "expert_wrong_samples": expert_score["wrong_samples"],
        }
        print(
            f"{task.name:14s} base {base_score['accuracy']:6.1%}  expert {expert_score['accuracy']:6.1%}  "
            f"{'ok' if ok else 'FAIL'}",
            flush=True,
        )

    if args.cross:
        for expert in tasks:
            model.set_adapter(expert.name)
            cross[expert.name] = {
                task.name: _score(model, tokenizer, task, eval_sets[task.name])["accuracy"]
                if task.name != expert.name
                else rows[task.name]["expert_accuracy"]
                for task in tasks
            }

    header = "| task | base | expert | margin | train s | reused | expert folder |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['base_accuracy']:.0%} | {row['expert_accuracy']:.0%} | {row['margin']:+.0%} | "
            f"{row['train_seconds']:.0f} | {'yes' if row['reused'] else 'no'} | {row['path']} |"
        )
    print("\n" + "\n".join(lines))
    if cross:
        print("\nexpert (row) x task (column):")
        print("| expert | " + " | ".join(t.name for t in tasks) + " |")
        for name, accs in cross.items():
            print(f"| {name} | " + " | ".join(f"{accs[t.name]:.0%}" for t in tasks) + " |")

    passed = all(row["passed"] for row in rows.values())
    report = {
        "base": str(args.base),
        "recipe": recipe.as_dict(),
        "eval_split": "eval",
        "n": args.n,
        "thresholds": {"min_accuracy": args.min_acc, "min_margin": args.min_margin},
        "passed": passed,
        "tasks": rows,
        **({"cross": cross} if cross else {}),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}; {'all experts pass' if passed else 'SOME EXPERTS FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
