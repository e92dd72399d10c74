"""The `moerge` CLI on a real SQLite database and store: init, db upgrade, expert add|list|show|rm|verify."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.fixtures.cli import invoke


def test_refuses_unmigrated_database(cli_env: Path) -> None:
    code, output = invoke("expert", "list")
    assert code == 1
    assert "not migrated" in output and "moerge db upgrade" in output


def test_init_prints_key_once(cli_env: Path) -> None:
    code, output = invoke("init")
    assert code == 0, output
    assert "admin key (shown once" in output
    code, output = invoke("init")
    assert code == 0 and "already exist" in output and "mk-" not in output


def test_init_takes_key_from_environment(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOERGE_ADMIN_KEY", "my-own-admin-key-0123456789")
    code, output = invoke("init")
    assert code == 0 and "MOERGE_ADMIN_KEY" in output and "my-own-admin-key" not in output


def test_expert_lifecycle(cli_env: Path, tiny_base: Path, tiny_lora: Path) -> None:
    assert invoke("db", "upgrade")[0] == 0
    code, output = invoke("expert", "add", str(tiny_base), "--slug", "tiny-base", "--description", "tiny")
    assert code == 0, output
    assert "registered base tiny-base" in output
    code, output = invoke(
        "expert",
        "add",
        str(tiny_lora),
        "--slug",
        "tiny-lora",
        "--base",
        "tiny-base",
        "--skill",
        "math",
        "--skill",
        "dates",
        "--example",
        "What is 2+2?",
        "--json",
    )
    assert code == 0, output
    record = json.loads(output)
    assert record["kind"] == "adapter" and record["routing"]["skills"] == ["math", "dates"]

    code, output = invoke("expert", "list", "--json")
    assert code == 0 and json.loads(output)["total"] == 2
    code, output = invoke("expert", "list", "--kind", "adapter")
    assert code == 0 and "tiny-lora" in output and "1 experts" in output

    code, output = invoke("expert", "show", "tiny-lora", "--card")
    assert code == 0 and output.startswith("---\n") and "base_model: tiny-base" in output

    code, output = invoke("expert", "verify")
    assert code == 0 and "2 experts verified" in output

    code, output = invoke("expert", "rm", "tiny-base")
    assert code == 1 and "base of 'tiny-lora'" in output
    assert invoke("expert", "rm", "tiny-lora")[0] == 0
    assert invoke("expert", "rm", "tiny-base")[0] == 0
    assert json.loads(invoke("expert", "list", "--json")[1])["total"] == 0


def test_verify_reports_damage(cli_env: Path, tiny_base: Path) -> None:
    assert invoke("db", "upgrade")[0] == 0
    assert invoke("expert", "add", str(tiny_base), "--slug", "b")[0] == 0
    record = json.loads(invoke("expert", "show", "b")[1])
    weights = next(f for f in record["integrity"]["files"] if f["path"] == "model.safetensors")
    blob = cli_env / "store" / "blobs" / weights["sha256"][:2] / weights["sha256"]
    os.chmod(blob, 0o644)
    with blob.open("r+b") as fh:  # flip bytes in the middle of the tensor data
        fh.seek(blob.stat().st_size // 2)
        fh.write(b"\xde\xad\xbe\xef")
    code, output = invoke("expert", "verify", "b")
    assert code == 1
    assert "DAMAGED" in output and "model.safetensors" in output and "hash mismatch" in output


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "adapter_model.bin").write_bytes(b"x"), "safetensors only"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "model.safetensors"),
    ],
    ids=["pickle", "corrupt"],
)
def test_add_refuses_bad_folder(cli_env: Path, tiny_base: Path, tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    assert invoke("db", "upgrade")[0] == 0
    folder = tmp_path / "bad"
    shutil.copytree(tiny_base, folder)
    mutate(folder)
    code, output = invoke("expert", "add", str(folder), "--slug", "bad")
    assert code == 1 and "error:" in output and message in output
    store = cli_env / "store"
    assert not any((store / "blobs").rglob("*")) or not [p for p in (store / "blobs").rglob("*") if p.is_file()]
    assert not list((store / "tmp").iterdir())
    assert json.loads(invoke("expert", "list", "--json")[1])["total"] == 0


def test_add_refuses_duplicate_slug_and_orphan_adapter(cli_env: Path, tiny_base: Path, tiny_lora: Path) -> None:
    assert invoke("db", "upgrade")[0] == 0
    code, output = invoke("expert", "add", str(tiny_lora), "--slug", "orphan")
    assert code == 1 and "base" in output and "not registered" in output
    assert invoke("expert", "add", str(tiny_base), "--slug", "b")[0] == 0
    code, output = invoke("expert", "add", str(tiny_base), "--slug", "b")
    assert code == 1 and "slug" in output and "already exists" in output


def test_strategies_lists_every_kind_with_help_and_refuses_an_unknown_kind(cli_env: Path) -> None:
    from aggregators import AGGREGATORS
    from merging.methods import METHODS

    code, output = invoke("strategies", "aggregators")
    assert code == 0, output
    listed = [
        line.split(":")[0].strip()
        for line in output.splitlines()
        if line.startswith("  ") and not line.startswith("    ")
    ]
    assert listed == list(AGGREGATORS.names())
    assert "tau (float, default 1.0)" in output  # a parameter with its type and default
    code, output = invoke("strategies")
    assert code == 0 and all(f"  {name}:" in output for name in METHODS.names())
    code, output = invoke("strategies", "bogus")
    assert code == 1 and "must be one of routers" in output
