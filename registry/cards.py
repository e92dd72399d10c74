"""Model cards: Hugging Face style (YAML front matter + markdown body), built from an expert's record.

A card given in the expert's README.md is kept: its front matter is merged under the fields the registry
knows for certain (kind, base, license, evals), and its body is used as is. Otherwise a body is written
from the description, routing fields and evals.
"""

from __future__ import annotations

from typing import Any

import yaml

from registry.models import Expert


def card_metadata(expert: Expert) -> dict[str, Any]:
    meta: dict[str, Any] = dict(expert.card_metadata or {})
    meta["model_name"] = expert.slug
    if expert.license:
        meta["license"] = expert.license
    meta["library_name"] = expert.library or ("peft" if expert.kind == "adapter" else "transformers")
    if expert.base is not None:
        meta["base_model"] = expert.base.slug
    tags = list(dict.fromkeys([*meta.get("tags", []), *expert.tags, "moerge", expert.kind]))
    meta["tags"] = tags
    if expert.datasets:
        meta["datasets"] = list(expert.datasets)
    if expert.evals:
        meta["model-index"] = [
            {
                "name": expert.slug,
                "results": [
                    {
                        "task": {"name": ev.task},
                        "dataset": {"name": ev.dataset or ev.task, "split": ev.split or "eval"},
                        "metrics": [{"type": ev.metric, "value": ev.value}],
                    }
                    for ev in expert.evals
                ],
            }
        ]
    return meta


def card_body(expert: Expert) -> str:
    if expert.card_body and expert.card_body.strip():
        return expert.card_body.strip() + "\n"
    lines = [f"# {expert.slug}", "", expert.description or f"A {expert.kind} registered in moerge.", ""]
    facts: list[tuple[str, object]] = [
        ("kind", expert.kind),
        ("base", expert.base.slug if expert.base else None),
    ]
    facts += [("architecture", expert.architecture), ("dtype", expert.dtype)]
    if expert.kind == "adapter":
        facts += [("peft type", expert.peft_type), ("rank", expert.r), ("lora_alpha", expert.lora_alpha)]
        facts += [("target modules", ", ".join(expert.target_modules) or None)]
    lines += ["## Details", ""] + [f"- **{k}**: {v}" for k, v in facts if v not in (None, "")] + [""]
    if expert.task_description or expert.skills or expert.example_prompts:
        lines += ["## Routing", ""]
        if expert.task_description:
            lines += [expert.task_description, ""]
        if expert.skills:
            lines += [f"- **skills**: {', '.join(expert.skills)}"]
        if expert.domains:
            lines += [f"- **domains**: {', '.join(expert.domains)}"]
        lines += [f"- example: `{p}`" for p in expert.example_prompts[:5]] + [""]
    if expert.evals:
        lines += ["## Evaluation", "", "| task | split | metric | value |", "| --- | --- | --- | --- |"]
        lines += [f"| {e.task} | {e.split or ''} | {e.metric} | {e.value:.4g} |" for e in expert.evals] + [""]
    return "\n".join(lines)


def render_card(expert: Expert) -> str:
    front = yaml.safe_dump(card_metadata(expert), sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n{card_body(expert)}"
