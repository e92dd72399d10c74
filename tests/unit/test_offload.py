"""registry.offload.run_to_completion: file work in a thread that a cancellation cannot cut short, and the
upload staging that uses it."""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from pathlib import Path

import pytest
from litestar.datastructures import UploadFile

from api.experts import intake
from registry.offload import run_to_completion


def _held(release: threading.Event, started: threading.Event, result: object, *, fail: bool = False) -> object:
    started.set()
    assert release.wait(timeout=20), "never released"
    if fail:
        raise OSError("disk full")
    return result


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.005)


async def test_runs_in_a_worker_thread() -> None:
    assert await run_to_completion(threading.get_ident) != threading.get_ident()


@pytest.mark.parametrize("fail", [False, True])
async def test_cancelled_caller_waits_for_the_work_then_cleans_up(fail: bool) -> None:
    release, started = threading.Event(), threading.Event()
    cleaned: list[object] = []
    task = asyncio.create_task(
        run_to_completion(partial(_held, release, started, "blob", fail=fail), on_cancel=cleaned.append)
    )
    await _until(started)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # the thread still runs: the caller's cleanup must not start yet
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # a finished call's result goes to on_cancel; a failed one has nothing to clean
    assert cleaned == ([] if fail else ["blob"])


async def test_upload_staging_copies_in_a_worker_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    original = intake.copy_stream_limited

    def recording(*args: object, **kwargs: object) -> int:
        threads.append(threading.get_ident())
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intake, "copy_stream_limited", recording)
    upload = UploadFile(content_type="application/octet-stream", filename="config.json", file_data=b"{}")
    folder = await intake.stage_upload([("files", upload)], tmp_path, max_unpacked_bytes=1024)
    assert (folder / "config.json").read_bytes() == b"{}"
    assert threads and threading.get_ident() not in threads
