"""moerge's Prometheus metrics, defined once here (the lowest layer) so serving, jobs, composition and api all
record into the same ones. Every name starts with ``moerge_``; ``GET /metrics`` (api/metrics/) exposes them.

Several processes share them: ``moerge serve`` replicas and ``moerge worker`` processes on one host each write
their samples to files of one folder (prometheus_client's multi-process mode) and ``/metrics`` sums the files.
:func:`enable` switches a process to that folder before it records anything; the folder is
``PROMETHEUS_MULTIPROC_DIR`` when set, else ``$MOERGE_HOME/metrics`` (``Settings.metrics_path``). Every metric
here has labels, so no value exists before the first ``labels(...)`` call and the switch reaches all of them.
A process removes its live gauges' files when it exits (``mark_process_dead``); counters and histograms stay,
so totals never go down when a process ends (prometheus_client's rule: clear the folder only while no moerge
process runs).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, multiprocess, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable (read by Settings.from_env too)

# Seconds: a /v1 request runs from milliseconds (a cached tiny model) to minutes (a long answer on a CPU).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)

# -- requests (api/metrics/middleware.py; api/openai/) ---------------------------------------------------------
# kind: the model's kind (base, adapter, merged, finetune, composition), "" for a request that names no model.
REQUESTS = Counter(
    "moerge_requests", "HTTP requests by route template, model kind and status", ["route", "kind", "status"]
)
REQUEST_SECONDS = Histogram(
    "moerge_request_duration_seconds",
    "time from a request's arrival to the end of its response (a stream's last event)",
    ["route", "kind"],
    buckets=LATENCY_BUCKETS,
)
FIRST_TOKEN_SECONDS = Histogram(
    "moerge_time_to_first_token_seconds",
    "streamed /v1 answers: time from the request's arrival to its first generated chunk",
    ["route", "kind"],
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("moerge_prompt_tokens", "prompt tokens of /v1 answers, by model kind", ["kind"])
COMPLETION_TOKENS = Counter("moerge_completion_tokens", "completion tokens of /v1 answers, by model kind", ["kind"])

# -- compositions ----------------------------------------------------------------------------------------------
ROUTER_DECISIONS = Counter(
    "moerge_router_decisions",
    "experts a composition's router chose (/v1 and the admin panel's queries)",
    ["composition", "expert"],
)
FALLBACKS = Counter("moerge_fallbacks", "queries a composition's fallback answered (no expert fitted)", ["composition"])
MEMBER_FAILURES = Counter(
    "moerge_member_failures", "chosen experts of a composition whose generation failed (/v1)", ["composition", "expert"]
)

# -- vLLM servers (serving/); base: the base model's registry id --------------------------------------------------
SERVER_STATES = ("starting", "ready", "dead", "remote", "unreachable")
VLLM_SERVER_STARTS = Counter(
    "moerge_vllm_server_starts", "managed vLLM server starts (restarts included), by outcome", ["base", "outcome"]
)
VLLM_SERVER_RESTARTS = Counter("moerge_vllm_server_restarts", "managed vLLM servers restarted after dying", ["base"])
# livesum: per base and state, how many live moerge processes see their server in that state (1 or 0 each).
VLLM_SERVER_STATE = Gauge(
    "moerge_vllm_server_state",
    "vLLM servers by base and state (one-hot per process; summed over the live processes)",
    ["base", "state"],
    multiprocess_mode="livesum",
)
ADAPTER_LOADS = Counter(
    "moerge_adapter_loads", "adapters loaded into vLLM servers (local: managed; remote: by URL)", ["base", "where"]
)

# -- jobs (jobs/worker.py) --------------------------------------------------------------------------------------
JOBS = Counter("moerge_jobs", "jobs a worker finished or settled, by kind and final status", ["kind", "status"])
JOB_SECONDS = Histogram(
    "moerge_job_duration_seconds", "time a worker ran a job, by kind and final status", ["kind", "status"],
    buckets=JOB_BUCKETS,
)  # fmt: skip

_ALL = (
    REQUESTS,
    REQUEST_SECONDS,
    FIRST_TOKEN_SECONDS,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    ROUTER_DECISIONS,
    FALLBACKS,
    MEMBER_FAILURES,
    VLLM_SERVER_STARTS,
    VLLM_SERVER_RESTARTS,
    VLLM_SERVER_STATE,
    ADAPTER_LOADS,
    JOBS,
    JOB_SECONDS,
)

_folder: Path | None = None  # this process's, once enable() ran


def server_state(base: str, state: str) -> None:
    """Record that this process sees ``base``'s vLLM server in ``state`` (one of SERVER_STATES)."""
    for each in SERVER_STATES:
        VLLM_SERVER_STATE.labels(base=base, state=each).set(1.0 if each == state else 0.0)


def folder() -> Path | None:
    """The folder this process writes its samples to (None before :func:`enable`)."""
    return _folder


def enable(path: Path) -> Path:
    """Write this process's samples to files under ``path`` from now on, and remove its live gauges' files when it
    exits; returns the folder in use. The first call in a process decides (an app made later in the same process,
    as tests make them, shares it); ``PROMETHEUS_MULTIPROC_DIR`` set before start-up decides before any call."""
    global _folder
    if _folder is None:
        preset = os.environ.get(MULTIPROC_ENV)
        _folder = Path(preset) if preset else path
        _folder.mkdir(parents=True, exist_ok=True)
        if not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client chose in-memory values at import (the variable was unset): switch to files. Values
            # recorded before this switch stay in memory, unseen by /metrics: forget them.
            for metric in _ALL:
                metric.clear()
            os.environ[MULTIPROC_ENV] = str(_folder)  # read by prometheus_client's file values and its collector
            values.ValueClass = values.MultiProcessValue()
        _sweep_dead(_folder)
        atexit.register(_exit, _folder)
    else:
        _folder.mkdir(parents=True, exist_ok=True)  # removed behind our back: the collector needs it
    return _folder


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _sweep_dead(path: Path) -> None:
    """Remove the live gauges of processes that died without cleaning up (killed): they are not live."""
    for pid in {int(m.group(1)) for f in path.iterdir() if (m := _LIVE_GAUGE_FILE.match(f.name))}:
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):  # another process may be removing them too
                multiprocess.mark_process_dead(pid, str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exit(path: Path) -> None:
    # The process exiting, which after a fork may be a child: each removes its own files.
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(os.getpid(), str(path))
