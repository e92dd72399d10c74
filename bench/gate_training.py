"""Time PHATGOOSE gate training for one demo expert on the real SmolLM2 base (not a test).

    python -m bench.gate_training --task dates [--steps 100 --batch-size 4 --lr 0.01 --threads 2]

Trains on the task's train split (the examples the recipe trained the expert on) and prints one JSON line:
seconds, losses at the start and end, examples used. Uses the newest complete cached expert of the task.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evals.recipe import LoraRecipe, default_out_root, is_complete
from evals.tasks import get_task
from registry.convert import cached_smollm2
from registry.training_data import TrainingRow
from routers.token.phatgoose import GateTrainingConfig, train_gates
from serving.mixture.adapters import load_lora_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dates")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folders = [p for p in default_out_root().glob(f"{args.task}-*") if is_complete(p)]
    if not folders:
        raise SystemExit(f"no trained {args.task} expert under {default_out_root()}: run `moerge demo` first")
    folder = max(folders, key=lambda p: p.stat().st_mtime)
    task = get_task(args.task)
    rows = [TrainingRow.from_prompt(ex.prompt, ex.answer) for ex in task.examples("train", LoraRecipe().train_examples)]
    config = GateTrainingConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    started = time.perf_counter()
    result = train_gates(load_lora_adapter(folder, args.task), Path(cached_smollm2()), rows, config)
    print(
        json.dumps(
            {
                "task": args.task,
                "expert": folder.name,
                "config": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr},
                "threads": args.threads,
                "seconds_total": round(time.perf_counter() - started, 1),
                "seconds_train_gates": round(result.seconds, 1),
                "loss_first5": round(sum(result.losses[:5]) / 5, 4),
                "loss_last5": round(sum(result.losses[-5:]) / 5, 4),
                "examples": result.examples,
                "modules": len(result.gates),
            }
        )
    )


if __name__ == "__main__":
    main()
