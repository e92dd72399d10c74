"""A line every few seconds for a long step that reports no progress of its own (a model conversion, an ONNX
export): in a log, the step is seen to be running, not hung."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def ticking(log: logging.Logger, what: str, *, every_s: float = 5.0) -> Iterator[None]:
    """Log ``what`` when it starts, ``what: N s so far`` every ``every_s`` while the block runs, and how long it
    took when it ends (or that it failed)."""
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            log.info("%s: %.0f s so far", what, time.monotonic() - started)

    log.info("%s", what)
    ticker = threading.Thread(target=tick, name="moerge-ticking", daemon=True)
    ticker.start()
    try:
        yield
    except BaseException:
        log.info("%s: failed after %.0f s", what, time.monotonic() - started)
        raise
    else:
        log.info("%s: done in %.0f s", what, time.monotonic() - started)
    finally:
        done.set()
        ticker.join()
