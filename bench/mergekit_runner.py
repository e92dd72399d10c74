"""Run mergekit (from its own venv, see scripts/mergekit_env.sh) as a measured subprocess.

mergekit lives in ``.venv-mergekit`` (it wants other transformers / peft versions than moerge), so the
benchmark drives its ``mergekit-yaml`` CLI and measures the process from outside:

* wall time: ``time.perf_counter`` around the subprocess;
* peak memory: two measures, the larger reported as ``peak_rss_mb``. (1) The kernel's own high-water
  mark of the child, ``ru_maxrss`` from ``os.wait4`` (exact, but of one process: the largest of the child
  and its reaped descendants, not their sum). (2) The summed RSS of the whole process tree polled with
  psutil every ``poll_s`` (can miss a spike shorter than the interval; skipped if psutil is missing).
  RSS includes file pages the process has mmapped (safetensors weights are read through mmap), as it
  does for any executor measured with :func:`run_measured`; ``tree_peak_anon_mb`` (polled too) leaves
  those file-backed pages out, i.e. the memory the process allocated itself.

:func:`run_measured` is generic so moerge's own executor can be measured the same way in a subprocess.

    from bench.merge_inputs import make_finetunes, mergekit_config
    from bench.mergekit_runner import mergekit_python, run_mergekit

    result = run_mergekit(mergekit_config("ties", base, models, params), Path("/tmp/out"), mergekit_python())
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VENV = ROOT / ".venv-mergekit"
STDERR_TAIL_CHARS = 4000


class MergekitError(RuntimeError):
    """mergekit-yaml exited non-zero (or timed out); the message carries the tail of its stderr."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


@dataclass
class Measurement:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    rss_method: str
    tree_peak_rss_mb: float | None
    tree_peak_anon_mb: float | None
    maxrss_mb: float
    timed_out: bool


def mergekit_python(setup: bool = True) -> Path:
    """The python of ``.venv-mergekit``; with ``setup``, run scripts/mergekit_env.sh first (idempotent)."""
    if setup:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "mergekit_env.sh")], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"scripts/mergekit_env.sh failed ({proc.returncode}):\n{proc.stderr[-STDERR_TAIL_CHARS:]}"
            )
        return Path(proc.stdout.strip().splitlines()[-1])
    python = MERGEKIT_VENV / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run `bash scripts/mergekit_env.sh`")
    return python


def mergekit_args(num_threads: int | None = None) -> list[str]:
    """The mergekit-yaml options used for the comparison: CPU only, same thread count as moerge gets,
    defaults otherwise (one output shard up to 5B parameters, tokenizer copied, synchronous writes)."""
    threads = num_threads or os.cpu_count() or 1
    return [
        "--no-cuda",  # default already; explicit so a GPU machine runs the same way
        "--no-low-cpu-memory",
        "--no-read-to-gpu",
        "--lazy-unpickle",  # only affects pickled .bin inputs; harmless with safetensors
        "--num-threads",
        str(threads),
        "--copy-tokenizer",
        "--no-async-write",
        "--quiet",  # no progress bars in the captured stderr
    ]


def run_mergekit(
    config: Mapping[str, Any],
    out_dir: Path,
    python: Path,
    extra_args: Sequence[str] = (),
    *,
    num_threads: int | None = None,
    overwrite: bool = False,
    timeout_s: float | None = None,
    poll_s: float = 0.05,
) -> dict[str, Any]:
    """Run ``mergekit-yaml`` with ``config`` into ``out_dir`` and measure it.

    ``python`` is the mergekit venv's python (its ``mergekit-yaml`` sits beside it). ``extra_args`` go after
    the default options of :func:`mergekit_args`, so they can override them. An existing non-empty
    ``out_dir`` is an error unless ``overwrite`` (then it is emptied first: mergekit would otherwise leave
    stale shards). Returns ``{"wall_s", "peak_rss_mb", "returncode", "output_dir", "stderr_tail",
    "rss_method", "tree_peak_rss_mb", "tree_peak_anon_mb", "maxrss_mb", "command"}``; raises
    :class:`MergekitError` (with the stderr tail) on a non-zero exit or a timeout.
    """
    python = Path(python)
    cli = python.parent / "mergekit-yaml"
    if not cli.exists():
        raise FileNotFoundError(f"{cli} missing: run `bash scripts/mergekit_env.sh`")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True to replace it)")
        _empty_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",  # local folders only; never wait on the hub
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)  # keep the project's packages out of mergekit's interpreter

    with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="mergekit-", delete=False) as f:
        yaml.safe_dump(dict(config), f, sort_keys=False)
        config_path = Path(f.name)
    try:
        command = [str(cli), str(config_path), str(out_dir), *mergekit_args(num_threads), *extra_args]
        m = run_measured(command, env=env, timeout_s=timeout_s, poll_s=poll_s)
    finally:
        config_path.unlink(missing_ok=True)

    result = {
        "wall_s": round(m.wall_s, 3),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "returncode": m.returncode,
        "output_dir": str(out_dir),
        "stderr_tail": m.stderr[-STDERR_TAIL_CHARS:],
        "rss_method": m.rss_method,
        "tree_peak_rss_mb": None if m.tree_peak_rss_mb is None else round(m.tree_peak_rss_mb, 1),
        "tree_peak_anon_mb": None if m.tree_peak_anon_mb is None else round(m.tree_peak_anon_mb, 1),
        "maxrss_mb": round(m.maxrss_mb, 1),
        "command": command,
    }
    if m.timed_out:
        raise MergekitError(f"mergekit-yaml timed out after {timeout_s} s:\n{result['stderr_tail']}", result)
    if m.returncode != 0:
        raise MergekitError(f"mergekit-yaml failed with exit code {m.returncode}:\n{result['stderr_tail']}", result)
    return result


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.05,
) -> Measurement:
    """Run ``command``, measuring wall time and peak memory (see the module doc); never raises on failure."""
    try:
        import psutil
    except ImportError:  # ru_maxrss alone
        psutil = None

    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,  # its own process group, so a timeout can stop the whole tree
        )
        tree_peak = tree_anon_peak = 0
        timed_out = False
        root = psutil.Process(proc.pid) if psutil is not None else None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if root is not None:
                rss, anon = _tree_rss(root, psutil)
                tree_peak = max(tree_peak, rss)
                tree_anon_peak = max(tree_anon_peak, anon)
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again

        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")

    maxrss_mb = usage.ru_maxrss / 1024  # KiB on Linux
    tree_mb = tree_peak / 2**20 if root is not None else None
    anon_mb = tree_anon_peak / 2**20 if root is not None else None
    return Measurement(
        wall_s=wall,
        peak_rss_mb=max(maxrss_mb, tree_mb or 0.0),
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        rss_method="max(wait4 ru_maxrss, psutil tree RSS poll)" if root is not None else "wait4 ru_maxrss",
        tree_peak_rss_mb=tree_mb,
        tree_peak_anon_mb=anon_mb,
        maxrss_mb=maxrss_mb,
        timed_out=timed_out,
    )


def describe_output(folder: Path) -> dict[str, Any]:
    """Layout of a merged model folder: files, weight shards, index file, tensor count and stored dtypes
    (read from the safetensors headers, no tensor loaded)."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    dtypes: Counter[str] = Counter()
    tensors = 0
    names: list[str] = []
    for shard in shards:
        with open(shard, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtypes[info["dtype"]] += 1
            names.append(name)
        tensors += len(header) - ("__metadata__" in header)
    index = folder / "model.safetensors.index.json"
    config = folder / "config.json"
    config_dtype = None
    if config.is_file():
        cfg = json.loads(config.read_text())
        config_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return {
        "files": sorted(p.name for p in folder.iterdir()),
        "shards": [s.name for s in shards],
        "index_file": index.name if index.is_file() else None,
        "tensors": tensors,
        "tensor_names": names,
        "stored_dtypes": dict(dtypes),
        "config_dtype": config_dtype,
        "bytes": sum(s.stat().st_size for s in shards),
    }


def _tree_rss(root: Any, psutil: Any) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over the tree, in bytes. Anonymous = RSS less resident file-backed and
    shared pages (psutil's ``shared``, from /proc/<pid>/statm on Linux): what the process itself allocated,
    without the page cache it maps (mmapped safetensors inputs)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = anon = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            info = p.memory_info()
            total += info.rss
            anon += info.rss - getattr(info, "shared", 0)
    return total, anon


def _empty_dir(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
