"""``ticking``: a long step with no progress of its own says, every few seconds, that it still runs."""

from __future__ import annotations

import logging
import time

import pytest

from core.progress import ticking


def test_ticking_logs_start_ticks_and_end(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("moerge.test.ticking")
    with caplog.at_level(logging.INFO, logger=log.name), ticking(log, "converting", every_s=0.05):
        time.sleep(0.3)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "converting" and messages[-1].startswith("converting: done in ")
    assert sum("s so far" in m for m in messages) >= 3


def test_ticking_says_when_the_step_failed(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("moerge.test.ticking")
    with (
        caplog.at_level(logging.INFO, logger=log.name),
        pytest.raises(RuntimeError),
        ticking(log, "exporting", every_s=10),
    ):
        raise RuntimeError("no")
    assert caplog.records[-1].getMessage().startswith("exporting: failed after ")
