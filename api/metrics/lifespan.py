"""At start-up: this process's metrics go to the folder every moerge process on the host shares (core/metrics.py),
and the app's per-minute rollups (registry/metrics.py) are made, written every MOERGE_METRICS_FLUSH_S in the
background and once more at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from api.deps import runtime_of
from core import metrics
from registry.metrics import Rollups


@asynccontextmanager
async def metrics_lifespan(app: Litestar) -> AsyncIterator[None]:
    """After the main lifespan made the runtime (its sessionmaker); its last flush runs before that closes. Nothing
    recorded before it: requests come later, and the in-process worker (made before) enabled the folder itself."""
    runtime = runtime_of(app.state)
    metrics.enable(runtime.settings.metrics_path)
    rollups = Rollups(runtime.sessionmaker, keep_s=runtime.settings.metrics_keep_h * 3600)
    app.state.rollups = rollups
    writer = rollups.writer(runtime.settings.metrics_flush_s).start()
    try:
        yield
    finally:
        await writer.stop()  # between two flushes: a flush cancelled inside a database call can hang (core/periodic.py)
        await rollups.close()
