"""Nothing registered can stop or stall a server: LoRA ranks, alphas and pattern keys at registration
(registry/limits.py, registry/inspect.py), the sum of a folder's safetensors headers, text no database holds,
and the vLLM engine's rank checks, on tiny real adapters."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from core.errors import Unprocessable, ValidationFailed
from registry.inspect import MAX_HEADERS_TOTAL_BYTES, inspect_folder, pattern_value
from registry.limits import MAX_PATTERN_KEY_CHARS, MAX_PATTERN_KEYS, first_lora_fault, is_pattern_key
from serving.engine import GenRequest, Sampling, Target
from serving.vllm import VLLMEngine
from serving.vllm_adapters import adapter_rank
from tests.fixtures.tiny import build_tiny_llama, build_tiny_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def lora_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(base_dir, tmp_path_factory.mktemp("lora") / "lora")


def _with_config(lora_dir: Path, dest: Path, **changes: Any) -> Path:
    folder = Path(shutil.copytree(lora_dir, dest))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    # allow_nan: Python's json (and PEFT's loader) read NaN and Infinity, so an attacker can write them.
    (folder / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))
    return folder


def _refused(folder: Path, param: str, reason: str, **kw: Any) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as exc:
        inspect_folder(folder, **kw)
    assert exc.value.status_code == 400
    assert exc.value.param == param, (exc.value.param, exc.value.message)
    assert reason in exc.value.message, exc.value.message
    return exc.value


# -- ranks and alphas ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param", "reason"),
    [
        ({"r": 1024}, "adapter_config.json:r", "r is 1024, above the largest LoRA rank served here"),
        ({"r": 4.0}, "adapter_config.json:r", "r must be a positive integer, got 4.0"),
        ({"r": True}, "adapter_config.json:r", "r must be a positive integer, got True"),
        ({"r": "4"}, "adapter_config.json:r", "r must be a positive integer, got '4'"),
        ({"r": -4}, "adapter_config.json:r", "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 1024}}, "adapter_config.json:rank_pattern.q_proj", "above the largest LoRA"),
        ({"rank_pattern": {"nowhere": 513}}, "adapter_config.json:rank_pattern.nowhere", "MOERGE_MAX_LORA_RANK=512"),
        ({"rank_pattern": {"q_proj": 4.0}}, "adapter_config.json:rank_pattern.q_proj", "positive integer"),
        ({"rank_pattern": {"q_proj": False}}, "adapter_config.json:rank_pattern.q_proj", "positive integer"),
        ({"rank_pattern": {"q_proj": "4"}}, "adapter_config.json:rank_pattern.q_proj", "positive integer"),
        ({"rank_pattern": [["q_proj", 4]]}, "adapter_config.json:rank_pattern", "must be an object"),
        ({"lora_alpha": NAN}, "adapter_config.json:lora_alpha", "finite positive number, got nan"),
        ({"lora_alpha": INF}, "adapter_config.json:lora_alpha", "finite positive number, got inf"),
        ({"lora_alpha": -INF}, "adapter_config.json:lora_alpha", "finite positive number"),
        ({"lora_alpha": 0}, "adapter_config.json:lora_alpha", "finite positive number, got 0"),
        ({"lora_alpha": -16}, "adapter_config.json:lora_alpha", "finite positive number"),
        ({"lora_alpha": True}, "adapter_config.json:lora_alpha", "finite positive number"),
        ({"alpha_pattern": {"v_proj": NAN}}, "adapter_config.json:alpha_pattern.v_proj", "finite positive"),
        ({"alpha_pattern": {"v_proj": 0.0}}, "adapter_config.json:alpha_pattern.v_proj", "finite positive"),
        ({"alpha_pattern": {"v_proj": "8"}}, "adapter_config.json:alpha_pattern.v_proj", "finite positive"),
    ],
    ids=lambda v: json.dumps(v, allow_nan=True) if isinstance(v, dict) else None,
)
def test_ranks_and_alphas_refused(lora_dir: Path, tmp_path: Path, change: dict, param: str, reason: str) -> None:
    _refused(_with_config(lora_dir, tmp_path / "a", **change), param, reason)


def test_rank_limit_is_the_setting(lora_dir: Path, tmp_path: Path) -> None:
    folder = _with_config(lora_dir, tmp_path / "a", rank_pattern={"v_proj": 4})
    assert inspect_folder(folder, max_lora_rank=4).r == 4  # the limit itself is allowed
    error = _refused(folder, "adapter_config.json:r", "MOERGE_MAX_LORA_RANK=2", max_lora_rank=2)
    assert "r is 4" in error.message


# -- pattern keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ({"(a+)+b": 4}, "key '(a+)+b' is not a module name"),
        ({"q_proj": 4, "^model.layers.0.q_proj": 4}, "is not a module name"),
        ({"model.layers.[0-9]+.q_proj": 4}, "is not a module name"),
        ({"q-proj": 4}, "is not a module name"),
        ({"": 4}, "is not a module name"),
        ({"q_pröj": 4}, "is not a module name"),
        ({"a" * (MAX_PATTERN_KEY_CHARS + 1): 4}, f"at most {MAX_PATTERN_KEY_CHARS} characters"),
        ({f"m{i}": 4 for i in range(MAX_PATTERN_KEYS + 1)}, f"{MAX_PATTERN_KEYS + 1} keys, more than 1000"),
    ],
    ids=["nested-quantifier", "anchor", "class", "dash", "empty", "non-ascii", "too-long", "too-many"],
)
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_must_be_module_names(
    lora_dir: Path, tmp_path: Path, field: str, pattern: dict[str, int], reason: str
) -> None:
    folder = _with_config(lora_dir, tmp_path / "a", **{field: pattern})
    _refused(folder, f"adapter_config.json:{field}", reason)


def test_pattern_keys_are_checked_before_any_value(lora_dir: Path, tmp_path: Path) -> None:
    # A valid key with a bad value comes first; the hostile key is still what is refused, before values.
    folder = _with_config(lora_dir, tmp_path / "a", rank_pattern={"q_proj": "x", "(a+)+b": 4})
    _refused(folder, "adapter_config.json:rank_pattern", "'(a+)+b' is not a module name")


def test_module_name_keys_register(lora_dir: Path, tmp_path: Path, base_dir: Path) -> None:
    """Keys PEFT writes (a leaf, or a dotted path) still register and still pick their modules' ranks."""
    adapter = tmp_path / "a"
    shutil.copytree(lora_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"model.layers.1.self_attn.v_proj": 2}
    cfg["alpha_pattern"] = {"v_proj": 4.5}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for key, value in load_file(str(adapter / "adapter_model.safetensors")).items():
        if "layers.1.self_attn.v_proj" in key:  # rank 2 for that one module, as rank_pattern says
            value = value[:2].clone() if "lora_A" in key else value[:, :2].clone()
        tensors[key] = value
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    insp = inspect_folder(adapter)
    assert insp.rank_pattern == {"model.layers.1.self_attn.v_proj": 2} and insp.alpha_pattern == {"v_proj": 4.5}


def test_pattern_value_is_linear_and_matches_peft() -> None:
    """pattern_value gives what PEFT's regex gives for every module-name key, and a hostile key (an older
    row) is never run: today's `(a+)+b` against 26 `a`s held the process 2.3 s."""
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "q_proj",
        "xq_proj",
        "model.layers.0.self_attnXq_proj",
        "a.b\nc.q_proj",
        "model.embed_tokens",
    ]
    keys = [
        "q_proj",
        "self_attn.q_proj",
        "layers.0.self_attn.q_proj",
        "layers.1.self_attn.q_proj",
        "layers..self_attn.q_proj",
        "self_attn.q.proj",
        "model.layers.0.mlp.down_proj",
        "q.proj",
        "c.q_proj",
        "b.c.q_proj",
        "embed_tokens",
        "......",
    ]
    for key in keys:
        assert is_pattern_key(key)
        for module in modules:
            expected = 1 if re.fullmatch(rf"(.*\.)?(?:{key})", module) else None
            assert pattern_value({key: 1}, module) == expected, (key, module)
    # first matching key wins, as in PEFT
    assert pattern_value({"k_proj": 1, "q_proj": 2, "self_attn.q_proj": 3}, modules[0]) == 2

    hostile = {"(a+)+b": 4, "(a|aa)+c": 8}
    started = time.perf_counter()
    for i in range(20):
        assert pattern_value(hostile, f"m{i}." + "a" * 28) is None
    assert pattern_value(hostile, "x.(a+)+b") == 4  # matched as plain text, never compiled
    assert time.perf_counter() - started < 0.05
    long_module = "model." + ".a" * 500_000  # a hostile tensor name: still linear in the key
    started = time.perf_counter()
    assert pattern_value({"a." * 99 + "b": 1}, long_module) is None
    assert time.perf_counter() - started < 0.05


def test_first_lora_fault_reads_rows() -> None:
    assert first_lora_fault(r=8, lora_alpha=None, rank_pattern=None, alpha_pattern=None, max_lora_rank=512) is None
    fault = first_lora_fault(r=8, lora_alpha=16.0, rank_pattern={"q_proj": 128}, alpha_pattern={}, max_lora_rank=64)
    assert fault is not None and fault.field == "rank_pattern.q_proj" and fault.rank == 128
    assert (
        fault.fix(64)
        == "re-register it with r and every rank_pattern value <= 64, or raise MOERGE_MAX_LORA_RANK to 128 or more"
    )
    fault = first_lora_fault(r=1024, lora_alpha=16.0, rank_pattern={}, alpha_pattern={}, max_lora_rank=512)
    assert fault is not None and "vLLM serves ranks up to 512" in fault.fix(512)


# -- safetensors headers of one registration -----------------------------------------------------------


def _sparse_safetensors(path: Path, header_len: int) -> None:
    """A file declaring a header of ``header_len`` bytes, as large as that on disk but holding no data
    (sparse): each passes the per-file check; together they pass the per-registration cap."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", header_len))
        fh.truncate(8 + header_len)


def test_sum_of_headers_is_bounded(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    share = MAX_HEADERS_TOTAL_BYTES // 3 + 1
    for i in range(1, 5):
        _sparse_safetensors(folder / f"model-0000{i}-of-00004.safetensors", share)
    started = time.perf_counter()
    error = _refused(folder, "files[model-00003-of-00004.safetensors]", "headers of this upload add up to more than")
    assert "100 MiB" in error.message
    assert time.perf_counter() - started < 1  # refused from the 8-byte prefixes, before a header is read


# -- text no database holds, and documents nested too deeply -------------------------------------------


def _replace(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("which", "name", "data", "reason"),
    [
        ("lora", "adapter_config.json", b'{"peft_type": "LORA", "r": 4, "x": "\xff\xfe"}', "not UTF-8 text"),
        ("base", "config.json", b'{"architectures": ["Ll\xc3\x28ama"]}', "not UTF-8 text"),
        ("lora", "README.md", b"hello \xc3\x28", "not UTF-8 text"),
        ("base", "tokenizer.json", b'{"model": "\xff"}', "tokenizer.json is not UTF-8 text"),
        ("base", "tokenizer_config.json", b'{"x": "a"}\xe2\x82', "ends mid-character"),
        ("lora", "README.md", b"hello \x00 world", "NUL character"),
        ("lora", "README.md", b'---\nlicense: "\\ud800"\n---\nbody', "README.md"),  # libyaml refuses it itself
        ("lora", "README.md", b'---\nlicense: "a\\0b"\n---\nbody', "NUL character"),
        ("lora", "README.md", b"---\nlicense: " + b"m" * 100 + b"\n---\nbody", "license is longer than 64"),
        ("base", "config.json", b'{"architectures": ["\\ud800"]}', "unpaired surrogate"),
        ("base", "config.json", b'{"architectures": ["Ll\\u0000ama"]}', "NUL character"),
        ("base", "config.json", json.dumps({"architectures": ["A" * 129]}).encode(), "longer than 128"),
        ("base", "config.json", json.dumps({"architectures": ["A"], "torch_dtype": "f" * 33}).encode(), "dtype"),
        ("base", "config.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ("lora", "adapter_config.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=[
        "adapter_config-utf8",
        "config-utf8",
        "readme-utf8",
        "tokenizer-utf8",
        "tokenizer_config-truncated-utf8",
        "readme-nul",
        "front-matter-surrogate",
        "front-matter-nul",
        "front-matter-long-license",
        "config-surrogate",
        "config-nul",
        "config-long-architecture",
        "config-long-dtype",
        "config-deep",
        "adapter_config-deep",
    ],
)
def test_documents_refused_by_file(
    base_dir: Path, lora_dir: Path, tmp_path: Path, which: str, name: str, data: bytes, reason: str
) -> None:
    folder = Path(shutil.copytree(base_dir if which == "base" else lora_dir, tmp_path / which))
    _refused(_replace(folder, name, data), f"files[{name}]", reason)


def test_deeply_nested_safetensors_header(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    _refused(folder, "files[model.safetensors]", "nested too deeply")


# -- the vLLM engine's rank checks (no server is started) ----------------------------------------------


async def test_vllm_refuses_rank_above_its_largest(tmp_path: Path) -> None:
    engine = VLLMEngine()
    try:
        target = Target(
            base_id="base",
            base_dir=tmp_path,
            adapter_id="id-1",
            adapter_dir=tmp_path,
            max_lora_rank=1024,
            served_name="big-lora",
        )
        [result] = await engine.generate([GenRequest(target=target, sampling=Sampling(), prompt="hi")])
        assert isinstance(result, Unprocessable), result
        assert "adapter 'big-lora' has rank 1024" in result.message and "MOERGE_ENGINE=torch" in result.message
        assert (await engine.status()) == []  # nothing recorded, nothing started

        # The restart path (an adapter folder declaring a larger rank than the running server's) too.
        server = engine._fleet.entry("base", tmp_path, 8)
        rank = server.rank
        with pytest.raises(Unprocessable, match="re-register it with r and every rank_pattern value <= 512"):
            await engine._adapters.restart_for_rank(server, target, "id-1", 1024)
        assert server.rank == rank and server.state == "dead" and server.proc is None
    finally:
        await engine.close()


def test_adapter_rank_reads_garbage_without_raising(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": "abc", "k": 16}}))
    assert adapter_rank(tmp_path) == 16
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": None, "rank_pattern": ["x"]}))
    assert adapter_rank(tmp_path) is None
    (tmp_path / "adapter_config.json").write_text("[" * 100_000)
    assert adapter_rank(tmp_path) is None
