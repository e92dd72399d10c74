"""A vLLM server "on another machine": a separate process under its own Unix user, which cannot read moerge's
data directory, with its own cache and HOME, stock vLLM LoRA ops (only the resolver plugin loads:
``VLLM_PLUGINS=moerge_resolver``, so moerge's CPU ops and compile patch never do, as on a GPU machine) and
moerge's LoRA resolver (``resolver/``, pip-installed into the environment) fetching adapters from moerge.

Shared by tests/integration/test_remote_vllm.py and the benchmark of a first request through the resolver.
Running as another user needs root (CI runs as root); otherwise the server runs as this user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.load import free_port, wait_ready  # noqa: E402
from serving.vllm_process import cpu_bind_list, server_command, server_env  # noqa: E402

REMOTE_USER = "moerge-remote"


def ensure_user(name: str = REMOTE_USER) -> pwd.struct_passwd | None:
    """The Unix user remote servers run as (created once; needs root), or None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def can_read(user: pwd.struct_passwd | None, path: Path) -> bool:
    """Whether ``user`` can list ``path`` (asked of the system, as that user)."""
    if user is None:
        return os.access(path, os.R_OK | os.X_OK)
    done = subprocess.run(["ls", str(path)], user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True)
    return done.returncode == 0


def _interpreter(user: pwd.struct_passwd | None, work: Path) -> str:
    """The Python the server runs: this one, or for another user (who may not reach this interpreter: pyenv
    keeps it under /root here) a venv of the system's Python 3.11 that sees this environment's packages, vLLM
    and the pip-installed resolver among them (a .pth line adds them as a site directory)."""
    if user is None or can_run(user, sys.executable):
        return sys.executable
    system = next((p for p in ("/usr/bin/python3.11", "/usr/local/bin/python3.11") if can_run(user, p)), None)
    if system is None:
        raise RuntimeError(f"no Python 3.11 that the user {user.pw_name!r} can run")
    venv = work / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site_packages = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    (venv / "lib" / "python3.11" / "site-packages" / "host-packages.pth").write_text(
        f"import site; site.addsitedir({site_packages!r})\n"
    )
    return str(venv / "bin" / "python")


def can_run(user: pwd.struct_passwd, program: str) -> bool:
    try:
        done = subprocess.run(
            [program, "-c", "pass"], user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0


@dataclass
class RemoteVLLM:
    """A running remote vLLM server: its URL, working folder (base model copy, HOME, resolver cache) and log."""

    url: str
    work: Path
    cache: Path
    log: Path
    proc: subprocess.Popen[bytes]
    user: pwd.struct_passwd | None

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- remote vLLM ({self.log}) ---\n{text[-chars:]}"

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]]


@contextlib.contextmanager
def remote_vllm(
    base: Path,
    *,
    moerge_url: str,
    fetch_key: str,
    served_name: str = "remote-base",
    max_lora_rank: int = 8,
    max_loras: int = 4,
    max_model_len: int = 512,
    kv_cache_gib: float = 1,
    start_timeout_s: float = 600,
    port: int | None = None,
) -> Iterator[RemoteVLLM]:
    """Start the server on a copy of ``base`` (the remote machine has its own copy of the base model) and wait
    until it is ready; stop its whole process group at exit."""
    user = ensure_user()
    work = Path(tempfile.mkdtemp(prefix="moerge-remote-"))
    try:
        work.chmod(0o755)  # mkdtemp makes it 0700; the remote user owns what is inside
        model = work / "model"
        shutil.copytree(base, model)
        home, cache = work / "home", work / "resolver-cache"
        home.mkdir()
        cache.mkdir()
        if user is not None:
            for path in (model, *model.iterdir(), home, cache):
                os.chown(path, user.pw_uid, user.pw_gid)
        port = port or free_port()
        command = server_command(
            model_dir=model,
            served_name=served_name,
            port=port,
            host="127.0.0.1",
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            max_model_len=max_model_len,
            python=_interpreter(user, work),
        )
        env = server_env(
            kv_cache_gib,
            {
                "HOME": str(home),
                "XDG_CACHE_HOME": str(home / ".cache"),
                "VLLM_CACHE_ROOT": str(home / ".cache" / "vllm"),
                "VLLM_PLUGINS": "moerge_resolver",  # stock vLLM: none of moerge's own plugins
                # vLLM's `auto` keeps one of this machine's two cores for its scheduler; managed servers bind all
                "VLLM_CPU_OMP_THREADS_BIND": cpu_bind_list("all"),
                "MOERGE_RESOLVER_URL": moerge_url,
                "MOERGE_RESOLVER_KEY": fetch_key,
                "MOERGE_RESOLVER_CACHE": str(cache),
            },
        )
        env.pop("MOERGE_VLLM_LORA_OPS", None)
        env.pop("MOERGE_VLLM_COMPILE", None)
        log = work / "vllm.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                command,
                env=env,
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        server = RemoteVLLM(f"http://127.0.0.1:{port}", work, cache, log, proc, user)
        try:
            wait_ready(
                f"{server.url}/health",
                "the remote vLLM server",
                lambda: proc.poll() is None,
                server.log_tail,
                start_timeout_s,
                poll_s=0.5,
            )
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            time.sleep(0.5)  # its engine-core child leaves with the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # whatever happened, nothing is left in /tmp
