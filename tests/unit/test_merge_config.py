"""A mergekit-style YAML imports as mergekit reads it: the base listed among the models is not a task vector,
per-model parameters under the top-level ``parameters`` are defaults, ``out_dtype`` / ``tokenizer_source`` /
``chat_template`` are honoured; what moerge cannot do is refused by field. Errors name the entry as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from core.errors import ValidationFailed
from merging.config import check_request, parse_request
from merging.executor import execute
from merging.plan import ModelRef, plan_merge
from tests.fixtures.tiny import build_tiny_finetune, build_tiny_llama

TEMPLATE = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"

MERGEKIT_YAML = f"""\
models:
  - model: base
  - model: m0
    parameters:
      weight: 0.7
      density: 0.5
  - model: m1
    parameters:
      weight: 0.3
merge_method: ties
base_model: base
parameters:
  normalize: true
  density: 0.3
dtype: bfloat16
out_dtype: float32
tokenizer_source: base
chat_template: "{TEMPLATE}"
"""


@pytest.fixture(scope="module")
def finetunes(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("mergekit-inputs")
    return [build_tiny_finetune(tiny_base, root / f"ft{i}", scale=0.02, seed=20 + i) for i in range(2)]


def _plan(raw: dict[str, Any] | str, base: Path, inputs: dict[str, Path]) -> Any:
    checked = check_request(parse_request(raw, yaml_text=isinstance(raw, str)))
    refs = [ModelRef(entry.model, inputs[entry.model]) for entry in checked.models]
    return plan_merge(checked, ModelRef("base", base), refs)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_mergekit_yaml_reads_as_mergekit_does(tiny_base: Path, finetunes: list[Path]) -> None:
    checked = check_request(parse_request(MERGEKIT_YAML, yaml_text=True))
    assert checked.positions == (1, 2)  # the base's own entry is not an input
    assert [m.model for m in checked.models] == ["m0", "m1"]
    assert [(p.weight, p.density) for p in checked.inputs] == [(0.7, 0.5), (0.3, 0.3)]  # type: ignore[attr-defined]
    assert checked.config.normalize is True  # type: ignore[attr-defined]
    assert checked.output_dtype == "float32"  # out_dtype wins over mergekit's compute dtype
    # linear merges the base's own weights: there it stays an input
    linear = check_request(
        parse_request({"merge_method": "linear", "base_model": "base", "models": [{"model": "base"}, {"model": "m0"}]})
    )
    assert linear.positions == (0, 1)


def test_mergekit_yaml_merges_like_the_same_merge_written_out(
    tiny_base: Path, finetunes: list[Path], tmp_path: Path
) -> None:
    inputs = {"m0": finetunes[0], "m1": finetunes[1]}
    imported = execute(_plan(MERGEKIT_YAML, tiny_base, inputs), tmp_path / "imported")
    explicit = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "m0", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "m1", "parameters": {"weight": 0.3, "density": 0.3}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    written = execute(_plan(explicit, tiny_base, inputs), tmp_path / "explicit")
    got, want = _weights(imported.folder), _weights(written.folder)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert {t.dtype for t in got.values()} == {torch.float32}
    assert (imported.folder / "chat_template.jinja").read_text() == TEMPLATE
    prompt = AutoTokenizer.from_pretrained(imported.folder).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert prompt == "<user>hi"
    card = (imported.folder / "README.md").read_text()
    assert "density: 0.3" in card and "weight: 0.3" in card  # the defaults as applied, recorded


@pytest.mark.parametrize(
    ("change", "param", "reason"),
    [
        ({"slices": [{"sources": [{"model": "m0", "layer_range": [0, 2]}]}]}, "slices", "not supported"),
        ({"tokenizer_source": "union"}, "tokenizer_source", "base's tokenizer"),
        ({"chat_template": "chatml"}, "chat_template", "Jinja"),
        ({"out_dtype": "float64"}, "out_dtype", "float32"),
        (
            {"models": [{"model": "base"}, {"model": "m0"}, {"model": "m1", "parameters": {"density": [1, 0.5]}}]},
            "models[2].parameters.density",
            "density",
        ),
        (
            {"models": [{"model": "base"}, {"model": "m0"}, {"model": "m1", "parameters": {"density": 1.5}}]},
            "models[2].parameters.density",
            "density",
        ),
        ({"parameters": {"densty": 0.2}}, "parameters.densty", "densty"),
        ({"output": {"format": "lora"}}, "chat_template", "LoRA output"),
    ],
)
def test_what_moerge_cannot_honour_is_refused_by_field(change: dict[str, Any], param: str, reason: str) -> None:
    import yaml

    raw = {**yaml.safe_load(MERGEKIT_YAML), **change}
    with pytest.raises(ValidationFailed) as info:
        check_request(parse_request(raw))
    assert info.value.param == param and reason in info.value.message, info.value.message


def test_plan_errors_name_the_entry_as_written(tiny_base: Path, finetunes: list[Path], tmp_path: Path) -> None:
    """With the base's entry first, the second finetune is models[2] in the file, and so in the error."""
    wide = build_tiny_llama(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ValidationFailed) as info:
        _plan(MERGEKIT_YAML, tiny_base, {"m0": finetunes[0], "m1": wide})
    assert info.value.param == "models[2].model", info.value.message
