"""The streaming merge executor on tiny models: equal to merging whole state dicts, LoRA deltas equal PEFT's,
LoRA outputs (SVD, cat), sharding, cancellation and failures that leave nothing behind; plan validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.errors import ValidationFailed
from merging.config import check_request, parse_request
from merging.executor import MERGE_RECORD, ExecutorOptions, MergeCancelled, execute
from merging.methods import METHODS, merge_tensor
from merging.plan import ModelRef, plan_merge
from tests.fixtures.tiny import build_tiny_finetune, build_tiny_llama, build_tiny_lora

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def models(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("merge-inputs")
    return {
        "base": tiny_base,
        "finetunes": [build_tiny_finetune(tiny_base, root / f"ft{i}", scale=0.02, seed=i + 1) for i in range(3)],
        "loras": [
            build_tiny_lora(tiny_base, root / f"lora{i}", r=4 + 4 * i, alpha=8, target_modules=TARGETS, seed=i + 1)
            for i in range(2)
        ],
        "other": build_tiny_llama(root / "other-base", hidden_size=48),
    }


def _plan(raw: dict[str, Any], base: Path | None, inputs: list[Path]) -> Any:
    checked = check_request(parse_request(raw))
    return plan_merge(
        checked,
        ModelRef("base", base) if base is not None else None,
        [ModelRef(f"m{i}", p) for i, p in enumerate(inputs)],
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def test_full_merge_equals_whole_state_dict_merge(models: dict[str, Any], tmp_path: Path) -> None:
    """Streaming, threads and in-place shard writes change nothing: the same numbers as merging each
    tensor of fully loaded state dicts."""
    params = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.5}, {"weight": 2.0, "density": 0.2}]
    raw = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": f"m{i}", "parameters": p} for i, p in enumerate(params)],
        "parameters": {"lambda": 0.8},
    }
    plan = _plan(raw, models["base"], models["finetunes"])
    seen: list[tuple[int, int]] = []
    outcome = execute(
        plan,
        tmp_path / "out",
        options=ExecutorOptions(workers=2, max_in_flight=2),
        on_progress=lambda done, total, _name: seen.append((done, total)),
    )
    got = _weights(outcome.folder)
    base = _weights(models["base"])
    fts = [_weights(f) for f in models["finetunes"]]
    method = METHODS.get("ties")
    config, inputs = METHODS.configure("ties", {"lambda": 0.8}, params)
    assert set(got) == set(base)
    for name, w0 in base.items():
        expected = w0 + merge_tensor(method, [ft[name] - w0 for ft in fts], inputs, config)
        assert torch.equal(got[name], expected), name
    assert [d for d, _ in seen] == list(range(1, len(base) + 1)) and {t for _, t in seen} == {len(base)}
    assert outcome.tensors == len(base) and not _leftovers(tmp_path)
    record = json.loads((outcome.folder / MERGE_RECORD).read_text())
    assert record["merge_method"] == "ties" and [m["model"] for m in record["models"]] == ["m0", "m1", "m2"]
    card = (outcome.folder / "README.md").read_text()
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    assert yaml.safe_load(front)["base_model"] == ["base", "m0", "m1", "m2"]  # parents, base first
    m2_line = next(line for line in body.splitlines() if line.startswith("- `m2`"))
    assert "- base: `base`" in body and "'weight': 2.0" in m2_line and "'density': 0.2" in m2_line
    recorded = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recorded["parameters"]["lambda"] == 0.8 and recorded["base_model"] == "base"
    assert [m["parameters"]["density"] for m in recorded["models"]] == [0.3, 0.5, 0.2]
    model = AutoModelForCausalLM.from_pretrained(outcome.folder)  # a loadable model folder
    assert model.config.hidden_size == 32


def test_shards_and_index_load_the_same_model(models: dict[str, Any], tmp_path: Path) -> None:
    raw = {"merge_method": "linear", "models": [{"model": "m0"}, {"model": "m1", "parameters": {"weight": 3}}]}
    plan = _plan(raw, None, models["finetunes"][:2])
    whole = execute(plan, tmp_path / "whole")
    sharded = execute(plan, tmp_path / "sharded", options=ExecutorOptions(max_shard_bytes=20_000))
    files = sorted(p.name for p in sharded.folder.glob("*.safetensors"))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    index = json.loads((sharded.folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    a, b = _weights(whole.folder), _weights(sharded.folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m0, m1 = _weights(models["finetunes"][0]), _weights(models["finetunes"][1])
    assert all(torch.allclose(a[k], (m0[k] + 3 * m1[k]) / 4) for k in a)  # linear normalizes by default
    ids = torch.tensor([[1, 2, 3]])
    logits = [AutoModelForCausalLM.from_pretrained(f.folder)(ids).logits for f in (whole, sharded)]
    assert torch.equal(logits[0], logits[1])


def test_one_lora_as_full_model_equals_peft_merge_and_unload(models: dict[str, Any], tmp_path: Path) -> None:
    plan = _plan({"merge_method": "task_arithmetic", "models": [{"model": "m0"}]}, models["base"], models["loras"][:1])
    got = _weights(execute(plan, tmp_path / "out").folder)
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, models["loras"][0]).merge_and_unload()
    want = merged.state_dict()
    for name, tensor in got.items():
        assert torch.allclose(tensor, want[name], atol=1e-6), name
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(got[untouched], _weights(models["base"])[untouched])


def _delta(adapter: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    a = adapter[f"base_model.model.{module}.lora_A.weight"]
    b = adapter[f"base_model.model.{module}.lora_B.weight"]
    return scale * b @ a


def test_lora_outputs_cat_exact_and_svd_optimal(models: dict[str, Any], tmp_path: Path) -> None:
    entries = [{"model": "m0", "parameters": {"weight": 0.7}}, {"model": "m1", "parameters": {"weight": -0.4}}]
    adapters = [load_file(p / "adapter_model.safetensors") for p in models["loras"]]
    scales = [8 / 4, 8 / 8]  # lora_alpha / r of the two fixtures
    module = "model.layers.1.self_attn.q_proj"
    want = sum(w * _delta(ad, module, s) for w, ad, s in zip((0.7, -0.4), adapters, scales, strict=True))

    cat = execute(
        _plan(
            {"merge_method": "task_arithmetic", "models": entries, "output": {"format": "cat"}},
            models["base"],
            models["loras"],
        ),
        tmp_path / "cat",
    ).folder
    cfg = json.loads((cat / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    assert torch.allclose(_delta(load_file(cat / "adapter_model.safetensors"), module, 1.0), want, atol=1e-6)

    ranks = {}
    for rank in (16, 1):
        out = execute(
            _plan(
                {"merge_method": "task_arithmetic", "models": entries, "output": {"format": "lora", "rank": rank}},
                models["base"],
                models["loras"],
            ),
            tmp_path / f"svd{rank}",
        ).folder
        ranks[rank] = _delta(load_file(out / "adapter_model.safetensors"), module, 1.0)
    assert torch.allclose(ranks[16], want, atol=1e-5)  # rank 16 >= 4 + 8: exact
    singular = torch.linalg.svdvals(want)
    error = torch.linalg.matrix_norm(want - ranks[1])
    assert torch.isclose(error, singular[1:].norm(), rtol=1e-4)  # Eckart-Young: the best rank-1 approximation

    # The merged LoRA on its base gives the same model as the full-model merge of the same adapters.
    full = execute(
        _plan({"merge_method": "task_arithmetic", "models": entries}, models["base"], models["loras"]),
        tmp_path / "full",
    ).folder
    ids = torch.tensor([[5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    via_lora = PeftModel.from_pretrained(base, cat)(ids).logits
    via_full = AutoModelForCausalLM.from_pretrained(full)(ids).logits
    assert torch.allclose(via_lora, via_full, atol=1e-4)


def test_dare_is_reproducible_from_its_seed(models: dict[str, Any], tmp_path: Path) -> None:
    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        raw = {
            "merge_method": "dare_ties",
            "models": [{"model": f"m{i}", "parameters": {"density": 0.5}} for i in range(3)],
            "seed": seed,
        }
        return _weights(execute(_plan(raw, models["base"], models["finetunes"]), tmp_path / name).folder)

    a, b, c = run(7, "a"), run(7, "b"), run(8, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cancel_and_failure_leave_nothing(models: dict[str, Any], tmp_path: Path) -> None:
    plan = _plan(
        {"merge_method": "ties", "models": [{"model": "m0"}, {"model": "m1"}]}, models["base"], models["finetunes"][:2]
    )
    progress: list[int] = []
    with pytest.raises(MergeCancelled):
        execute(
            plan,
            tmp_path / "cancelled",
            on_progress=lambda d, _t, _n: progress.append(d),
            should_cancel=lambda: len(progress) >= 3,
        )
    assert 3 <= len(progress) < 20  # stopped between tensors, well before the end

    def explode(done: int, _total: int, _name: str) -> None:
        if done == 5:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        execute(plan, tmp_path / "failed", on_progress=explode)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no destination, no partial folder
    with pytest.raises(FileExistsError):
        (tmp_path / "taken").mkdir()
        execute(plan, tmp_path / "taken")


@pytest.mark.parametrize(
    ("raw", "base", "inputs", "param"),
    [
        ({"merge_method": "ties", "models": [{"model": "m0"}]}, None, ["finetunes", 0], "base_model"),
        ({"merge_method": "linear", "models": [{"model": "m0"}, {"model": "m1"}]}, None, ["mixed"], "models[1].model"),
        (
            {"merge_method": "ties", "models": [{"model": "m0"}], "output": {"format": "lora"}},
            "base",
            ["finetunes", 0],
            "output.format",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "m0"}], "output": {"format": "cat"}},
            "base",
            ["loras", 0],
            "output.format",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "m0", "parameters": {"density": 1.5}}]},
            "base",
            ["finetunes", 0],
            "models[0].parameters.density",
        ),
        ({"merge_method": "tiez", "models": [{"model": "m0"}]}, "base", ["finetunes", 0], "merge_method"),
        (
            {"merge_method": "ties", "models": [{"model": "m0", "parameters": {"densty": 0.2}}]},
            "base",
            ["finetunes", 0],
            "models[0].parameters.densty",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "m0"}], "output": {"format": "lora", "rank": 7}},
            "base",
            ["loras", 0],
            "output.rank",
        ),
    ],
)
def test_invalid_merges_are_refused_before_any_work(
    models: dict[str, Any], tmp_path: Path, raw: dict[str, Any], base: str | None, inputs: list[Any], param: str
) -> None:
    folders = [models["finetunes"][0], models["other"]] if inputs == ["mixed"] else [models[inputs[0]][inputs[1]]]
    with pytest.raises(ValidationFailed) as info:
        _plan(raw, models["base"] if base else None, folders)
    assert info.value.param == param, info.value.message
    assert param.split(".")[-1].split("[")[0] in info.value.message


def test_incompatible_shapes_are_named(models: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed) as info:
        _plan(
            {"merge_method": "ties", "models": [{"model": "m0"}, {"model": "m1"}]},
            models["base"],
            [models["finetunes"][0], models["other"]],
        )
    assert info.value.param == "models[1].model" and "m1" in info.value.message


def test_inputs_must_descend_from_the_base(models: dict[str, Any]) -> None:
    """Registered finetunes (not only adapters) are checked against base_model's lineage: a task vector taken
    against another base of the same shapes would be noise. A finetune of a finetune merges onto that finetune."""
    import uuid

    base_a, base_b, finetune_of_a = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    checked = check_request(
        parse_request({"merge_method": "ties", "base_model": "base", "models": [{"model": "m0"}, {"model": "m1"}]})
    )
    fts = models["finetunes"]

    def plan(base: ModelRef | None, bases: list[uuid.UUID]) -> Any:
        refs = [ModelRef(f"m{i}", fts[i], expert_id=uuid.uuid4(), base_id=b) for i, b in enumerate(bases)]
        return plan_merge(checked, base, refs)

    on_a = ModelRef("base", models["base"], expert_id=base_a)
    with pytest.raises(ValidationFailed) as info:
        plan(on_a, [base_a, base_b])
    assert info.value.param == "models[1].model" and "another base than base_model base" in info.value.message
    assert plan(on_a, [base_a, base_a]).base is not None
    # base_model is itself a finetune of A: inputs on A and inputs finetuned from it both fit
    on_finetune = ModelRef("base", models["base"], expert_id=finetune_of_a, base_id=base_a)
    assert plan(on_finetune, [base_a, finetune_of_a]).base is not None
    linear = check_request(parse_request({"merge_method": "linear", "models": [{"model": "m0"}, {"model": "m1"}]}))
    refs = [ModelRef(f"m{i}", fts[i], expert_id=uuid.uuid4(), base_id=b) for i, b in enumerate([base_a, base_b])]
    with pytest.raises(ValidationFailed) as info:
        plan_merge(linear, None, refs)
    assert info.value.param == "models" and "different bases" in info.value.message


def test_tied_head_merges_as_its_embedding_and_an_untied_one_onto_a_tied_base_is_refused(
    models: dict[str, Any], tmp_path: Path
) -> None:
    """A finetune with tied embeddings stores no lm_head; merged onto a base with its own head, its head is its
    embedding (not a KeyError mid-merge). A finetune with its own head cannot merge onto a tied base."""
    untied = build_tiny_llama(tmp_path / "untied", seed=11, tie_word_embeddings=False)
    tied_ft = models["finetunes"][0]
    raw = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "m0"}]}
    outcome = execute(_plan(raw, untied, [tied_ft]), tmp_path / "out")
    got, base, ft = _weights(outcome.folder), _weights(untied), _weights(tied_ft)
    assert "lm_head.weight" not in ft and set(got) == set(base)
    method = METHODS.get("task_arithmetic")
    config, inputs = METHODS.configure("task_arithmetic", {}, [{}])
    head = base["lm_head.weight"]
    expected = head + merge_tensor(method, [ft["model.embed_tokens.weight"] - head], inputs, config)
    assert torch.equal(got["lm_head.weight"], expected)

    untied_ft = build_tiny_finetune(untied, tmp_path / "untied-ft", seed=12)
    with pytest.raises(ValidationFailed) as info:
        _plan(raw, models["base"], [untied_ft])
    assert info.value.param == "models[0].model" and "own lm_head.weight" in info.value.message


def test_in_flight_tensors_are_bounded_and_spread_over_threads(
    models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What bounds memory: at most ``max_in_flight`` tensor names are being merged at once, on the worker
    threads (not the caller's)."""
    import threading
    import time

    import merging.executor as executor_module

    lock = threading.Lock()
    running = 0
    most = 0
    threads: set[str] = set()
    original = executor_module.merge_tensor

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        time.sleep(0.005)  # long enough for the others to pile up if nothing held them back
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(executor_module, "merge_tensor", counting)
    raw = {"merge_method": "ties", "base_model": "base", "models": [{"model": "m0"}, {"model": "m1"}]}
    for workers, in_flight in ((4, 2), (3, 3)):
        most, threads = 0, set()
        execute(
            _plan(raw, models["base"], models["finetunes"][:2]),
            tmp_path / f"out-{workers}-{in_flight}",
            options=ExecutorOptions(workers=workers, max_in_flight=in_flight),
        )
        assert most == in_flight, (workers, in_flight, most)
        assert len(threads) > 1 and all(name.startswith("merge") for name in threads), threads


def test_a_finetune_and_a_lora_merge_together(models: dict[str, Any], tmp_path: Path) -> None:
    """Mixed inputs: the finetune's task vector and the adapter's scale·B·A (as PEFT merges it) go into one
    TIES merge, tensor by tensor; modules the adapter leaves alone get a zero delta from it."""
    raw = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "m0", "parameters": {"density": 0.4}}, {"model": "m1", "parameters": {"weight": 0.6}}],
    }
    got = _weights(
        execute(_plan(raw, models["base"], [models["finetunes"][0], models["loras"][1]]), tmp_path / "o").folder
    )
    base = _weights(models["base"])
    ft = _weights(models["finetunes"][0])
    peft_base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    lora_full = PeftModel.from_pretrained(peft_base, models["loras"][1]).merge_and_unload().state_dict()
    method = METHODS.get("ties")
    config, inputs = METHODS.configure("ties", {}, [{"density": 0.4}, {"weight": 0.6}])
    assert set(got) == set(base)
    for name, w0 in base.items():
        expected = w0 + merge_tensor(method, [ft[name] - w0, lora_full[name] - w0], inputs, config)
        assert torch.allclose(got[name], expected, atol=1e-6), name
