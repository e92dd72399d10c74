"""The packages' import contracts (pyproject.toml [tool.importlinter]) hold: a change that makes an import point
the wrong way fails the tests, and so CI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout.split("Contracts:")[-1]  # and it did check the contracts


def test_no_import_is_exempted() -> None:
    """The contracts hold as written: none of them allows an import by name (``ignore_imports``)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert [c["name"] for c in contracts if c.get("ignore_imports")] == []
