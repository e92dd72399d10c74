"""The metrics' settings, what managed vLLM servers inherit of them, and the dashboard's chart geometry."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.admin.activity import HEIGHT, LEFT, PAD, WIDTH, WINDOW_MIN, activity
from core.settings import Settings
from registry.models import ModelMinute, RoutingMinute
from serving.vllm_process import child_env_allowed


def test_metrics_settings(tmp_path: Path) -> None:
    plain = Settings.from_env({"MOERGE_HOME": str(tmp_path)})
    assert plain.metrics_token is None and plain.metrics_path == tmp_path / "metrics"
    assert (plain.metrics_flush_s, plain.metrics_keep_h) == (60.0, 24.0)
    shared = tmp_path / "shared"
    env = {
        "MOERGE_HOME": str(tmp_path),
        "MOERGE_METRICS_TOKEN": "t0k",
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        "MOERGE_METRICS_FLUSH_S": "5",
        "MOERGE_METRICS_KEEP_H": "2",
    }
    set_ = Settings.from_env(env)
    assert set_.metrics_token == "t0k" and set_.metrics_path == shared.resolve()
    assert (set_.metrics_flush_s, set_.metrics_keep_h) == (5.0, 2.0)
    with pytest.raises(ValueError, match="MOERGE_METRICS_FLUSH_S must be a positive number"):
        Settings.from_env({**env, "MOERGE_METRICS_FLUSH_S": "0"})


def test_vllm_servers_inherit_neither_the_token_nor_the_metrics_folder() -> None:
    # the token is a secret; the folder is moerge's (a vLLM server writing its own metrics there would mix them in)
    assert not child_env_allowed("MOERGE_METRICS_TOKEN")
    assert not child_env_allowed("PROMETHEUS_MULTIPROC_DIR")


def test_activity_scales_lines_and_shares() -> None:
    now = 1000
    models = [
        ModelMinute(minute=now, model="a", kind="adapter", requests=4, errors=1, latency_s=2.0),
        ModelMinute(minute=now - 1, model="a", kind="adapter", requests=2, errors=0, latency_s=2.0),
        ModelMinute(minute=now, model="c", kind="composition", requests=1, errors=0, latency_s=0.5),
        ModelMinute(minute=now - WINDOW_MIN, model="old", kind="base", requests=9, errors=0, latency_s=1.0),
    ]
    routes = [
        RoutingMinute(minute=now, composition="c", expert="a", decisions=3),
        RoutingMinute(minute=now - 5, composition="c", expert="b", decisions=1),
        RoutingMinute(minute=now - WINDOW_MIN, composition="c", expert="gone", decisions=50),
    ]
    got = activity(models, routes, now)
    assert [(t.model, t.total, t.errors) for t in got.models] == [("a", 6, 1), ("c", 1, 0)]  # "old": outside
    assert got.models[0].mean_latency_s == pytest.approx(4.0 / 6)
    requests = {line.label: line for line in got.requests.lines}
    assert got.requests.top == "4"
    right = LEFT + WIDTH
    # 4 requests in the last minute reach the top of the plot; the minute before, 2: halfway
    expected = [(right - WIDTH / (WINDOW_MIN - 1), PAD + HEIGHT / 2), (right, PAD)]
    assert requests["a (adapter)"].dots == [pytest.approx(xy, abs=0.05) for xy in expected]
    assert len(requests["a (adapter)"].points.split()) == WINDOW_MIN  # zeros are drawn on the axis
    latency = {line.label: line for line in got.latency.lines}
    assert len(latency["c (composition)"].points.split()) == 1  # only minutes with requests have a latency
    assert got.latency.top == "1 s"  # the largest mean of a minute: a's minute before last, 2.0 s over 2 requests
    [share] = got.routing
    assert (share.composition, share.decisions) == ("c", 4)
    assert [(e.expert, e.decisions, e.pct) for e in share.experts] == [("a", 3, 75.0), ("b", 1, 25.0)]
