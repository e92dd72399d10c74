"""The vLLM engine's server metrics (core/metrics.py): starts by outcome, restarts, and each base's state, through
the engine's own supervision code. As in test_vllm_room.py, POLICY_STAND_IN (a tiny HTTP server answering like
vLLM) stands in for `python -m vllm.entrypoints.openai.api_server`: what is tested is moerge's supervisor, not a
vLLM start (30-60 s each)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from core import metrics
from tests.integration.test_vllm_room import _ask, _engine, _served_by, _target, policy_stand_in  # noqa: F401


def _value(name: str, **labels: str) -> float:
    """``name``'s sample with ``labels``, summed over every process writing to this process's folder."""
    folder = metrics.folder()
    assert folder is not None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return sum(
        s.value for family in registry.collect() for s in family.samples if s.name == name and s.labels == labels
    )


def _states(base: str) -> dict[str, float]:
    return {state: _value("moerge_vllm_server_state", base=base, state=state) for state in metrics.SERVER_STATES}


@pytest.mark.usefixtures("policy_stand_in")
async def test_starts_restarts_and_state_of_a_managed_server(tmp_path: Path) -> None:
    metrics.enable(tmp_path / "metrics")  # a process's first call decides; later ones share that folder
    base = f"base-{uuid.uuid4().hex[:8]}"  # this test's own label values
    engine = _engine(tmp_path)
    target = _target(tmp_path, base)
    try:
        _served_by(await _ask(engine, target), base)
        assert _value("moerge_vllm_server_starts_total", base=base, outcome="ready") == 1
        assert _states(base) == {"starting": 0, "ready": 1, "dead": 0, "remote": 0, "unreachable": 0}

        [entry] = await engine.status()
        os.kill(entry["pid"], signal.SIGKILL)  # the server dies: the supervisor restarts it
        for _ in range(600):
            [entry] = await engine.status()
            if entry["state"] == "ready" and entry["restarts"] == 1:
                break
            await asyncio.sleep(0.05)
        assert entry["state"] == "ready" and entry["restarts"] == 1, entry
        assert _value("moerge_vllm_server_restarts_total", base=base) == 1
        assert _value("moerge_vllm_server_starts_total", base=base, outcome="ready") == 2
        assert _value("moerge_vllm_server_starts_total", base=base, outcome="failed") == 0
        assert _states(base)["ready"] == 1
    finally:
        await engine.close()
    assert _states(base) == {"starting": 0, "ready": 0, "dead": 1, "remote": 0, "unreachable": 0}
