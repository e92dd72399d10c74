"""The expert training recipe: its digest, and train_expert's folder, cache reuse and atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from evals import recipe as recipe_mod
from evals.recipe import COMPLETE_MARKER, LoraRecipe, base_manifest, expert_dir, train_expert
from evals.tasks import get_task
from routers.token.encoding import IGNORE_INDEX, answer_loss

# The tiny tokenizer is character-level, so examples run to a few hundred tokens.
TINY = LoraRecipe(steps=2, warmup_steps=0, batch_size=2, train_examples=8, max_length=512)

CHANGED = {
    "rank": 4,
    "alpha": 8,
    "dropout": 0.1,
    "target_modules": ("q_proj", "v_proj"),
    "learning_rate": 1e-3,
    "warmup_steps": 1,
    "steps": 3,
    "batch_size": 4,
    "max_length": 256,
    "train_examples": 16,
    "seed": 1,
}


def test_every_recipe_field_is_covered_by_the_test() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(LoraRecipe)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_digest_changes_with_each_recipe_field(field: str, tiny_base: Path) -> None:
    task = get_task("dates")
    changed = dataclasses.replace(TINY, **{field: CHANGED[field]})
    assert changed.digest(task, tiny_base) != TINY.digest(task, tiny_base)


def test_digest_covers_task_version_and_base(tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    dates, units = get_task("dates"), get_task("units")
    digest = TINY.digest(dates, tiny_base)
    assert digest == TINY.digest(dates, tiny_base)  # stable
    assert len(digest) == 64
    assert TINY.digest(units, tiny_base) != digest

    monkeypatch.setattr(type(dates), "version", dates.version + 1)
    assert TINY.digest(dates, tiny_base) != digest
    monkeypatch.undo()
    # An edited generator retrains even if nobody bumped the version.
    original = type(dates).make
    monkeypatch.setattr(type(dates), "make", lambda self, rng: dataclasses.replace(original(self, rng), answer="x"))
    assert TINY.digest(dates, tiny_base) != digest
    monkeypatch.undo()
    assert TINY.digest(dates, tiny_base) == digest

    # A base with another config is another base.
    other = tmp_path / "other-base"
    other.mkdir()
    for item in tiny_base.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    assert TINY.digest(dates, other) == digest  # same files, same digest: the path is not part of it
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    assert TINY.digest(dates, other) != digest

    monkeypatch.setattr(recipe_mod, "TRAINER_VERSION", recipe_mod.TRAINER_VERSION + 1)
    assert TINY.digest(dates, tiny_base) != digest


def test_base_manifest_refuses_a_non_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        base_manifest(tmp_path)


def test_recipe_validates_fields() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraRecipe(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraRecipe(dropout=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        LoraRecipe(steps=2, warmup_steps=2)
    with pytest.raises(ValueError, match="target_modules"):
        LoraRecipe(target_modules=("q_proj", "q_proj"))
    defaults = LoraRecipe()
    assert (defaults.rank, defaults.alpha, defaults.dropout, defaults.batch_size) == (8, 16, 0.0, 16)
    assert len(defaults.target_modules) == 7


def test_train_expert_writes_a_peft_folder_and_reuses_it(tiny_base: Path, tmp_path: Path) -> None:
    task = get_task("dates")
    steps: list[int] = []
    out = train_expert(task, tiny_base, tmp_path, TINY, on_step=lambda s, _n, _loss: steps.append(s))

    digest = TINY.digest(task, tiny_base)
    assert out == tmp_path / f"dates-{digest[:12]}" == expert_dir(task, tiny_base, tmp_path, TINY)
    assert steps == [1, 2]
    for name in ("adapter_config.json", "adapter_model.safetensors", COMPLETE_MARKER, "README.md", "recipe.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))  # safetensors only
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp folder left behind

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == TINY.rank and cfg["lora_alpha"] == TINY.alpha and cfg["peft_type"] == "LORA"
    assert set(cfg["target_modules"]) == set(TINY.target_modules)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)

    info = json.loads((out / "recipe.json").read_text())
    assert info["digest"] == digest and info["task"] == "dates" and info["recipe"] == TINY.as_dict()
    assert len(info["losses"]) == 2 and info["final_train_loss"] > 0 and info["train_seconds"] >= 0

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0" and meta["task"] == "dates"
    assert "moerge" in meta["tags"] and meta["base_model"]

    # Second call: same folder, nothing retrained or rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    steps.clear()
    again = train_expert(task, tiny_base, tmp_path, TINY, on_step=lambda s, _n, _loss: steps.append(s))
    assert again == out and steps == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_training_changes_the_model_and_masks_the_prompt(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ex = get_task("units").examples("train", 1)[0]
    ids, labels = recipe_mod._encode(tokenizer, ex, 512)
    assert len(ids) == len(labels)
    scored = [t for t in labels if t != IGNORE_INDEX]
    # Only the answer and the end-of-turn token are trained.
    assert tokenizer.decode(scored) == ex.answer + "<|im_end|>"
    assert labels[: len(labels) - len(scored)] == [IGNORE_INDEX] * (len(labels) - len(scored))
    with pytest.raises(ValueError, match="exceeds max_length"):
        recipe_mod._encode(tokenizer, ex, 10)


def test_answer_loss_matches_the_full_model_loss(tiny_base: Path) -> None:
    """The left-padded, last-positions-only loss equals transformers' own loss over right-padded rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    items = [recipe_mod._encode(tokenizer, ex, 512) for ex in get_task("json_extract").examples("train", 3)]
    assert len({len(ids) for ids, _ in items}) > 1  # rows of different lengths exercise the padding

    width = max(len(ids) for ids, _ in items)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in items])
    labels = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in items])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in items])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = answer_loss(model, items, pad)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_an_incomplete_folder_is_replaced(tiny_base: Path, tmp_path: Path) -> None:
    task = get_task("units")
    stale = expert_dir(task, tiny_base, tmp_path, TINY)
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")  # a crash left this without .complete
    out = train_expert(task, tiny_base, tmp_path, TINY)
    assert out == stale and (out / COMPLETE_MARKER).is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
