"""registry.inspect: header-only validation of model and LoRA folders, and fit against a base."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ValidationFailed
from registry.inspect import (
    FORBIDDEN_SUFFIXES,
    TensorInfo,
    adapter_module_shapes,
    check_adapter_fits_base,
    check_file_names,
    check_finetune_fits_base,
    inspect_folder,
    read_safetensors_header,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- builders ----------------------------------------------------------------------------------------


def _llama(*, hidden: int = 32, layers: int = 2, intermediate: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config)


def _save_model(dest: Path, **kw: int) -> Path:
    _llama(**kw).save_pretrained(dest, safe_serialization=True)
    return dest


def _save_adapter(dest: Path, *, model_kw: dict[str, int] | None = None, **lora_kw: object) -> Path:
    settings: dict[str, object] = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"]}
    lora = LoraConfig(**{**settings, **lora_kw})
    get_peft_model(_llama(**(model_kw or {})), lora).save_pretrained(dest)
    return dest


def _expect(exc: pytest.ExceptionInfo[ValidationFailed], param: str, reason: str) -> None:
    assert exc.value.param == param, exc.value.param
    assert reason in exc.value.message, exc.value.message


def _write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_adapter(tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def base_copy(base_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_dir, tmp_path / "model"))


# -- safetensors headers -----------------------------------------------------------------------------


def test_header_of_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)}, str(path))
    header = read_safetensors_header(path, param="files[w.safetensors]")
    assert header == {"a": TensorInfo("F32", (3, 4)), "b": TensorInfo("BF16", (2,))}


def test_header_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ValidationFailed) as exc:
        read_safetensors_header(path, param="files[w.safetensors]")
    _expect(exc, "files[w.safetensors]", "corrupt safetensors header")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),
        (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "non-negative"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "needs 8"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate"),
    ],
)
def test_header_bad_json(tmp_path: Path, header: bytes, reason: str) -> None:
    path = _write_raw(tmp_path / "w.safetensors", header, b"\0" * 8)
    with pytest.raises(ValidationFailed) as exc:
        read_safetensors_header(path, param="p")
    _expect(exc, "p", "corrupt safetensors header")
    assert reason in exc.value.message


@pytest.mark.parametrize("length", [0, 10_000, 200 * 1024 * 1024])
def test_header_absurd_length(tmp_path: Path, length: int) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}" + b"\0" * 64)
    with pytest.raises(ValidationFailed) as exc:
        read_safetensors_header(path, param="p")
    _expect(exc, "p", "declared header length")


def test_header_overlapping_tensors(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = _write_raw(tmp_path / "w.safetensors", json.dumps(header).encode(), b"\0" * 12)
    with pytest.raises(ValidationFailed) as exc:
        read_safetensors_header(path, param="p")
    _expect(exc, "p", "overlaps")


def test_truncated_weights(base_copy: Path) -> None:
    weights = base_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[model.safetensors]", "truncated: header declares")
    assert "file holds" in exc.value.message


def test_trailing_garbage(base_copy: Path) -> None:
    with open(base_copy / "model.safetensors", "ab") as fh:
        fh.write(b"garbage")
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[model.safetensors]", "trailing garbage")


# -- file names and folder rules ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "sub/adapter_model.bin", "x.PT", "ckpt.pickle"])
def test_pickle_names_refused(name: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        check_file_names(["config.json", name])
    _expect(exc, f"files[{name}]", "pickle checkpoints are refused: safetensors only")


def test_forbidden_suffixes_cover_pickles() -> None:
    assert {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"} == set(FORBIDDEN_SUFFIXES)


def test_bin_in_folder_refused(base_copy: Path) -> None:
    (base_copy / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[pytorch_model.bin]", "safetensors only")


def test_symlink_refused(base_copy: Path) -> None:
    (base_copy / "extra.json").symlink_to(base_copy / "config.json")
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[extra.json]", "links are refused")


def test_no_weights_refused(base_copy: Path) -> None:
    (base_copy / "model.safetensors").unlink()
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files", "no .safetensors weights found")


def test_model_needs_config(base_copy: Path) -> None:
    (base_copy / "config.json").unlink()
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files", "config.json is required")


def test_bad_config_json(base_copy: Path) -> None:
    (base_copy / "config.json").write_text("{oops")
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[config.json]", "not valid JSON")


# -- model folders -----------------------------------------------------------------------------------


def test_valid_model_folder(base_dir: Path) -> None:
    insp = inspect_folder(base_dir)
    model = _llama()
    assert insp.kind == "model"
    assert insp.architecture == "LlamaForCausalLM"
    assert insp.dtype == "float32"
    assert insp.param_count == sum(t.numel() for t in model.state_dict().values())
    assert insp.tensors["model.layers.0.self_attn.q_proj.weight"] == TensorInfo("F32", (32, 32))
    assert insp.tensor_files["lm_head.weight"] == "model.safetensors"
    assert [rel for rel, _ in insp.files] == sorted(rel for rel, _ in insp.files)
    assert insp.total_size == sum((base_dir / rel).stat().st_size for rel, _ in insp.files)
    assert insp.config is not None and insp.config["hidden_size"] == 32
    assert insp.adapter_config is None and insp.peft_type is None
    assert insp.tokenizer_hash is None
    assert insp.card_metadata == {} and insp.card_body is None


def test_dtype_inferred_from_tensors(base_copy: Path) -> None:
    config = json.loads((base_copy / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (base_copy / "config.json").write_text(json.dumps(config))
    assert inspect_folder(base_copy).dtype == "float32"


def test_tokenizer_hash(base_copy: Path) -> None:
    (base_copy / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (base_copy / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    first = inspect_folder(base_copy).tokenizer_hash
    assert first is not None and len(first) == 64
    assert inspect_folder(base_copy).tokenizer_hash == first
    (base_copy / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    assert inspect_folder(base_copy).tokenizer_hash != first


def test_sharded_model_with_index(tmp_path: Path) -> None:
    _llama().save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    insp = inspect_folder(tmp_path)
    assert len({rel for rel in insp.tensor_files.values()}) > 1
    assert insp.param_count == sum(t.numel() for t in _llama().state_dict().values())

    shard = next(tmp_path.glob("model-0000*.safetensors"))
    shard.unlink()
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(tmp_path)
    _expect(exc, "files[model.safetensors.index.json]", "is not in the folder")


def test_index_names_tensor_missing_from_shard(base_copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"no.such.weight": "model.safetensors"}}
    (base_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[model.safetensors.index.json]", "no.such.weight is not in shard model.safetensors")


def test_duplicate_tensor_across_shards(base_copy: Path) -> None:
    save_file({"lm_head.weight": torch.zeros(128, 32)}, str(base_copy / "extra.safetensors"))
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[model.safetensors]", "appears in both")


def test_readme_front_matter(base_copy: Path) -> None:
    (base_copy / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags: [math, tiny]\ndate: 2024-05-01\n---\n\n# Tiny\nA tiny model.\n"
    )
    insp = inspect_folder(base_copy)
    assert insp.card_metadata == {"license": "apache-2.0", "tags": ["math", "tiny"], "date": "2024-05-01"}
    assert insp.card_body == "# Tiny\nA tiny model.\n"


def test_readme_without_front_matter(base_copy: Path) -> None:
    (base_copy / "README.md").write_text("# Just a body\n")
    insp = inspect_folder(base_copy)
    assert insp.card_metadata == {} and insp.card_body == "# Just a body\n"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("---\nlicense: [unclosed\n---\nbody\n", "not valid YAML"),
        ("---\n- a\n- b\n---\nbody\n", "must be a YAML mapping"),
        ("---\nlicense: mit\nno end\n", "never closed"),
    ],
)
def test_readme_bad_front_matter(base_copy: Path, text: str, reason: str) -> None:
    (base_copy / "README.md").write_text(text)
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(base_copy)
    _expect(exc, "files[README.md]", reason)


# -- adapters ----------------------------------------------------------------------------------------


def test_valid_adapter(adapter_dir: Path, base_dir: Path) -> None:
    insp = inspect_folder(adapter_dir)
    assert insp.kind == "adapter"
    assert insp.peft_type == "LORA"
    assert insp.r == 4
    assert insp.lora_alpha == 16.0
    assert insp.use_rslora is False and insp.use_dora is False
    assert insp.target_modules == ["down_proj", "q_proj"]
    assert insp.modules_to_save is None
    assert insp.rank_pattern == {} and insp.alpha_pattern == {}
    assert insp.config is None and insp.architecture is None
    assert insp.dtype == "float32"
    assert insp.adapter_config is not None and insp.adapter_config["peft_type"] == "LORA"

    shapes = adapter_module_shapes(insp)
    assert shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert shapes["model.layers.1.mlp.down_proj"] == (32, 64)
    assert len(shapes) == 4
    check_adapter_fits_base(insp, inspect_folder(base_dir), base_slug="tiny")


def test_adapter_with_dora_rank_pattern_and_modules_to_save(tmp_path: Path, base_dir: Path) -> None:
    adapter = _save_adapter(
        tmp_path / "a",
        use_dora=True,
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        modules_to_save=["lm_head"],
    )
    insp = inspect_folder(adapter)
    assert insp.use_dora and insp.use_rslora
    assert insp.rank_pattern == {"down_proj": 2}
    assert insp.modules_to_save == ["lm_head"]
    assert adapter_module_shapes(insp)["model.layers.0.mlp.down_proj"] == (32, 64)
    check_adapter_fits_base(insp, inspect_folder(base_dir), base_slug="tiny")


def test_adapter_rank_disagrees_with_config(tmp_path: Path, adapter_dir: Path) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder)
    _expect(exc, "files[adapter_model.safetensors]", "declares r=8")


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"peft_type": "IA3"}, "only LORA adapters"), ({"r": 0}, "r must be a positive integer")],
)
def test_adapter_config_refused(tmp_path: Path, adapter_dir: Path, change: dict, reason: str) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder)
    _expect(exc, f"adapter_config.json:{next(iter(change))}", reason)  # the param names the field


def test_adapter_config_not_json(tmp_path: Path, adapter_dir: Path) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    (folder / "adapter_config.json").write_text('["LORA"]')
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder)
    _expect(exc, "files[adapter_config.json]", "must be a JSON object")


def test_adapter_unexpected_tensor(tmp_path: Path, adapter_dir: Path) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    (folder / "adapter_model.safetensors").unlink()
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
            "base_model.model.model.norm.weight": torch.zeros(32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder)
    _expect(exc, "files[adapter_model.safetensors]", "unexpected tensor base_model.model.model.norm.weight")


def test_adapter_missing_lora_b(tmp_path: Path, adapter_dir: Path) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    (folder / "adapter_model.safetensors").unlink()
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder)
    _expect(exc, "files[adapter_model.safetensors]", "lacks its lora_B weight")


def test_adapter_shapes_do_not_fit(tmp_path: Path, base_dir: Path) -> None:
    adapter = _save_adapter(tmp_path / "a", model_kw={"hidden": 64})
    with pytest.raises(ValidationFailed) as exc:
        check_adapter_fits_base(inspect_folder(adapter), inspect_folder(base_dir), base_slug="tiny")
    _expect(exc, "files[adapter_model.safetensors]", "adapter implies [64, 64], base has [32, 64]")
    assert exc.value.message.startswith("shape of model.layers.0.mlp.down_proj")


def test_adapter_module_missing_in_base(tmp_path: Path, adapter_dir: Path) -> None:
    base = _save_model(tmp_path / "one_layer", layers=1)
    with pytest.raises(ValidationFailed) as exc:
        check_adapter_fits_base(inspect_folder(adapter_dir), inspect_folder(base), base_slug="tiny-1l")
    _expect(exc, "target_modules", "module model.layers.1.mlp.down_proj not found in base tiny-1l")


def test_modules_to_save_shape_must_fit(tmp_path: Path, adapter_dir: Path, base_dir: Path) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    (folder / "adapter_model.safetensors").unlink()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
            "base_model.model.lm_head.weight": torch.zeros(128, 16),
        },
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(ValidationFailed) as exc:
        check_adapter_fits_base(inspect_folder(folder), inspect_folder(base_dir), base_slug="tiny")
    _expect(exc, "files[adapter_model.safetensors]", "shape of lm_head.weight: adapter has [128, 16]")


# -- finetunes ---------------------------------------------------------------------------------------


def test_finetune_fits(tmp_path: Path, base_dir: Path) -> None:
    ft = _save_model(tmp_path / "ft", seed=1)
    check_finetune_fits_base(inspect_folder(ft), inspect_folder(base_dir), base_slug="tiny")


def test_finetune_wrong_shape(tmp_path: Path, base_dir: Path) -> None:
    ft = _save_model(tmp_path / "ft", intermediate=48)
    with pytest.raises(ValidationFailed) as exc:
        check_finetune_fits_base(inspect_folder(ft), inspect_folder(base_dir), base_slug="tiny")
    _expect(exc, "files[model.safetensors]", "shape of model.layers.0.mlp.down_proj.weight: finetune has [32, 48]")


def test_finetune_wrong_architecture(tmp_path: Path, base_dir: Path) -> None:
    ft = _save_model(tmp_path / "ft")
    cfg = json.loads((ft / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (ft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationFailed) as exc:
        check_finetune_fits_base(inspect_folder(ft), inspect_folder(base_dir), base_slug="tiny")
    _expect(exc, "base", "architecture MistralForCausalLM differs from base tiny")


def test_finetune_tied_lm_head_is_fine(tmp_path: Path, base_dir: Path) -> None:
    ft = _save_model(tmp_path / "ft", seed=2)
    tensors = read_safetensors_header(ft / "model.safetensors", param="x")
    assert "lm_head.weight" in tensors
    # Rewrite the finetune without lm_head, as a tied-embedding checkpoint would be saved.
    state = load_file(str(ft / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(ft / "model.safetensors"))
    check_finetune_fits_base(inspect_folder(ft), inspect_folder(base_dir), base_slug="tiny")


def test_tokenizer_hash_matches_manual_digest(base_copy: Path) -> None:
    # Locks the framing so hashes stay comparable across versions of moerge.
    (base_copy / "tokenizer.model").write_bytes(b"spm")
    expected = hashlib.sha256(b"tokenizer.model\x003\x00spm").hexdigest()
    assert inspect_folder(base_copy).tokenizer_hash == expected


def test_adapter_lora_a_bias_is_unexpected(tmp_path: Path, adapter_dir: Path) -> None:
    folder = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    (folder / "adapter_model.safetensors").unlink()
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.bias": torch.zeros(4),
        },
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder)
    _expect(exc, "files[adapter_model.safetensors]", "unexpected tensor")
