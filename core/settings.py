"""Settings, read from the environment in one place.

Every knob is a ``MOERGE_*`` variable; :meth:`Settings.from_env` is the only reader.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Choices and names other layers read from here (core imports nothing of this project).
EMBEDDING_BACKENDS = ("onnx", "torch")  # the routers' embedding forward pass
LORA_OPS_ENV = "MOERGE_VLLM_LORA_OPS"  # read by moerge's plugin inside managed vLLM servers
LORA_OPS_CHOICES = ("grouped", "vllm")
COMPILE_ENV = "MOERGE_VLLM_COMPILE"
ENGINES = ("vllm", "torch")
MAX_LORA_RANK = 512  # vLLM's largest --max-lora-rank; the default of MOERGE_MAX_LORA_RANK

GiB = 1024**3
MAX_GENERATION_S = 600.0  # the default of MOERGE_MAX_GENERATION_S, also for engines and composers built in code


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _positive_float_env(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


def _flag_env(env: dict[str, str], name: str, default: bool) -> bool:
    return _choice_env(env, name, ("0", "1"), "1" if default else "0") == "1"


def _read_key_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _choice_env(env: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _pairs_env(env: dict[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """`a=http://x:8000,b=http://y:8000` -> (("a", "http://x:8000"), ("b", "http://y:8000"))."""
    pairs = []
    for item in filter(None, (p.strip() for p in env.get(name, "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{name}: expected BASE=URL items separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _names_env(env: dict[str, str], name: str) -> tuple[str, ...]:
    """`A,B_C` -> ("A", "B_C"): environment variable names."""
    names = tuple(filter(None, (n.strip() for n in env.get(name, "").split(","))))
    for item in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
            raise ValueError(f"{name}: expected environment variable names separated by commas, got {item!r}")
    return names


@dataclass(frozen=True)
class Settings:
    home: Path = field(metadata={"help": "data directory: database, artifact store, converted models"})
    database_url: str = field(metadata={"help": "SQLAlchemy async URL (sqlite+aiosqlite or postgresql+asyncpg)"})
    import_roots: tuple[Path, ...] = field(metadata={"help": "folders the API may import experts from by path"})
    max_upload_bytes: int = field(
        default=8 * GiB,
        metadata={
            "help": "largest body of an upload route (POST /api/experts, the admin register form); "
            "authenticated callers only"
        },
    )
    max_json_bytes: int = field(
        default=1024**2,
        metadata={"help": "largest body of every other route (/v1, JSON API routes, admin forms)"},
    )
    max_lora_rank: int = field(
        default=MAX_LORA_RANK,
        metadata={
            "help": "largest LoRA rank (r and every rank_pattern value) a registration may declare "
            "(512: vLLM's largest --max-lora-rank)"
        },
    )
    max_unpacked_bytes: int = field(default=16 * GiB, metadata={"help": "largest total size an archive may unpack to"})
    admin_key: str | None = field(default=None, metadata={"help": "first admin key for `moerge init`"})
    host: str = field(default="127.0.0.1", metadata={"help": "address `moerge serve` binds"})
    port: int = field(default=8000, metadata={"help": "port `moerge serve` binds"})
    api_url: str = field(default="", metadata={"help": "where `moerge query` / `moerge eval` reach the API"})
    api_key: str | None = field(default=None, metadata={"help": "key `moerge query` / `moerge eval` send"})
    engine: str = field(
        default="vllm", metadata={"help": "serving engine: vllm (managed servers) or torch (in process)"}
    )
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none"})
    vllm_remote: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"help": "base (slug or id) = URL of a vLLM server elsewhere; no process is started"}
    )
    vllm_kv_cache_gib: int = field(default=2, metadata={"help": "VLLM_CPU_KVCACHE_SPACE for managed servers"})
    vllm_max_servers: int = field(
        default=3, metadata={"help": "managed vLLM servers at once; the least recently used idle one makes room"}
    )
    vllm_max_model_len: int = field(default=2048, metadata={"help": "--max-model-len of managed servers"})
    vllm_cpu_threads_bind: str = field(
        default="all", metadata={"help": "VLLM_CPU_OMP_THREADS_BIND of managed servers (`all`: every CPU here)"}
    )
    vllm_lora_ops: str = field(
        default="grouped",
        metadata={"help": "multi-LoRA ops in managed CPU servers: grouped (moerge's, faster) or vllm (vLLM's own)"},
    )
    vllm_compile: bool = field(
        default=True,
        metadata={
            "help": "managed CPU servers run vLLM's compiled model with LoRA on (serving/vllm_compile.py): about "
            "30% faster decoding; the first start of a model compiles it (a minute or two here, cached after)"
        },
    )
    vllm_compact_json: bool = field(
        default=True,
        metadata={
            "help": "managed servers decode structured outputs (response_format, tool arguments) without free "
            "whitespace between JSON tokens (vLLM's disable_any_whitespace): a small model may otherwise pad an "
            "answer with newlines until max_tokens"
        },
    )
    vllm_env_passthrough: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "comma-separated names of more environment variables managed vLLM servers inherit; they "
            "get only an allow-list (PATH, HOME, locale, VLLM_*, OMP_*, torch/inductor/triton, HF_* but no "
            "token, ...), never moerge's keys, secrets or database URL"
        },
    )
    max_generation_s: float = field(
        default=MAX_GENERATION_S,
        metadata={
            "help": "every generation (one member's answer or a stream) is stopped after this long and the request "
            "answered with an error; a client that hangs up stops its generations at once"
        },
    )
    embedding_cache_mb: int = field(
        default=64,
        metadata={
            "help": "the routers' cache of query embeddings (by query text), in MiB; least recently used first out"
        },
    )
    torch_max_loaded_gib: float = field(
        default=8.0,
        metadata={
            "help": "the torch engine's loaded models and adapters, in GiB: past it the least recently used ones "
            "not in use are unloaded"
        },
    )
    vllm_keep_warm_s: int = field(
        default=60,
        metadata={"help": "a managed vLLM server that served within this long is never stopped to make room"},
    )
    vllm_server_wait_s: int = field(
        default=30,
        metadata={
            "help": "how long a request waits for room to start its model's vLLM server (max_servers reached, all "
            "busy or warm) before a 503 with Retry-After"
        },
    )
    embedding_backend: str = field(
        default="onnx",
        metadata={"help": "the routers' embedding forward pass: onnx (onnxruntime, exported once) or torch"},
    )
    embedding_model: str | None = field(
        default=None,
        metadata={
            "help": "sentence-transformers folder or hub id for the routers (default: packaged all-MiniLM-L6-v2)"
        },
    )

    session_secret: str | None = field(
        default=None,
        metadata={
            "help": "signs and encrypts the admin panel's session and CSRF cookies "
            "(default: generated once, kept in $MOERGE_HOME/session-secret)"
        },
    )
    admin_cookie_secure: bool = field(
        default=False,
        metadata={
            "help": "mark the admin panel's session and CSRF cookies Secure (sent over HTTPS only); off by default "
            "so the panel works on http://127.0.0.1"
        },
    )
    drain_s: int = field(
        default=30,
        metadata={
            "help": "on SIGTERM `moerge serve` stops taking requests (503, /api/ready says draining) and waits this "
            "long at most for the requests in flight (streams too) to finish, then exits"
        },
    )
    merge_stale_after_s: int = field(
        default=30,
        metadata={"help": "a running merge job whose heartbeat is older than this lost its worker: it is failed"},
    )
    metrics_token: str | None = field(
        default=None,
        metadata={"help": "a bearer token that may read GET /metrics besides an admin key (for a Prometheus scraper)"},
    )
    metrics_dir: Path | None = field(
        default=None,
        metadata={
            "help": "folder of the metrics' multi-process files, shared by every moerge process on this host "
            "(PROMETHEUS_MULTIPROC_DIR; default $MOERGE_HOME/metrics)"
        },
    )
    metrics_flush_s: float = field(
        default=60.0,
        metadata={
            "help": "how often each process adds its per-minute request and routing counts (the admin dashboard's "
            "charts) to the database"
        },
    )
    metrics_keep_h: float = field(
        default=24.0,
        metadata={"help": "per-minute counts older than this many hours are deleted from the database"},
    )
    store_orphan_age_s: int = field(
        default=600,
        metadata={
            "help": "at start, files a killed process left in the store (half-registered experts, temporary "
            "files, unreferenced blobs) untouched for this long are removed"
        },
    )

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    def session_key(self, purpose: str) -> bytes:
        """32 bytes for one use (``session``, ``csrf``) derived from the session secret; without one, a secret
        is generated once and kept (mode 0600) in the home folder, so sessions survive a restart."""
        secret = self.session_secret
        if not secret:
            path = self.home / "session-secret"
            secret = _read_key_file(path)
            if secret is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # another process made it first
                    pass
                else:
                    with os.fdopen(fd, "w") as out:
                        out.write(secrets.token_urlsafe(32))
                secret = _read_key_file(path) or ""
        return hashlib.sha256(f"moerge-{purpose}:{secret}".encode()).digest()

    @property
    def metrics_path(self) -> Path:
        return self.metrics_dir or self.home / "metrics"

    @property
    def merges_dir(self) -> Path:
        """Where merge jobs write their output before it is registered (then removed)."""
        return self.home / "merges"

    @property
    def jobs_dir(self) -> Path:
        """Where the other jobs (training, fitting) work; each job's folder is removed when it ends."""
        return self.home / "jobs"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        home = Path(env.get("MOERGE_HOME") or Path.home() / ".moerge").expanduser().resolve()
        database_url = env.get("MOERGE_DATABASE_URL") or f"sqlite+aiosqlite:///{home / 'moerge.db'}"
        roots_raw = env.get("MOERGE_IMPORT_ROOTS")
        roots = (
            tuple(Path(p).expanduser().resolve() for p in roots_raw.split(os.pathsep) if p)
            if roots_raw
            else (home / "imports",)
        )

        def default(name: str) -> Any:  # each default is written once, on its field
            return cls.__dataclass_fields__[name].default

        return cls(
            home=home,
            database_url=database_url,
            import_roots=roots,
            max_upload_bytes=_int_env(env, "MOERGE_MAX_UPLOAD_BYTES", default("max_upload_bytes")),
            max_unpacked_bytes=_int_env(env, "MOERGE_MAX_UNPACKED_BYTES", default("max_unpacked_bytes")),
            max_json_bytes=_int_env(env, "MOERGE_MAX_JSON_BYTES", default("max_json_bytes")),
            max_lora_rank=_int_env(env, "MOERGE_MAX_LORA_RANK", default("max_lora_rank")),
            admin_key=env.get("MOERGE_ADMIN_KEY") or None,
            host=env.get("MOERGE_HOST", default("host")),
            port=_int_env(env, "MOERGE_PORT", default("port")),
            api_url=env.get("MOERGE_URL")
            or f"http://{env.get('MOERGE_HOST', default('host'))}:{env.get('MOERGE_PORT', default('port'))}",
            api_key=env.get("MOERGE_API_KEY") or _read_key_file(home / "admin-key"),
            engine=_choice_env(env, "MOERGE_ENGINE", ENGINES, default("engine")),
            default_max_tokens=_int_env(env, "MOERGE_DEFAULT_MAX_TOKENS", default("default_max_tokens")),
            vllm_remote=_pairs_env(env, "MOERGE_VLLM_REMOTE"),
            vllm_kv_cache_gib=_int_env(env, "MOERGE_VLLM_KV_CACHE_GIB", default("vllm_kv_cache_gib")),
            vllm_max_servers=_int_env(env, "MOERGE_VLLM_MAX_SERVERS", default("vllm_max_servers")),
            vllm_max_model_len=_int_env(env, "MOERGE_VLLM_MAX_MODEL_LEN", default("vllm_max_model_len")),
            max_generation_s=_positive_float_env(env, "MOERGE_MAX_GENERATION_S", default("max_generation_s")),
            embedding_cache_mb=_int_env(env, "MOERGE_EMBED_CACHE_MB", default("embedding_cache_mb")),
            torch_max_loaded_gib=_positive_float_env(
                env, "MOERGE_TORCH_MAX_LOADED_GIB", default("torch_max_loaded_gib")
            ),
            vllm_keep_warm_s=_int_env(env, "MOERGE_VLLM_KEEP_WARM_S", default("vllm_keep_warm_s")),
            vllm_server_wait_s=_int_env(env, "MOERGE_VLLM_SERVER_WAIT_S", default("vllm_server_wait_s")),
            embedding_model=env.get("MOERGE_EMBEDDING_MODEL") or None,
            embedding_backend=_choice_env(
                env, "MOERGE_EMBEDDING_BACKEND", EMBEDDING_BACKENDS, default("embedding_backend")
            ),
            vllm_cpu_threads_bind=env.get("MOERGE_VLLM_CPU_THREADS_BIND") or default("vllm_cpu_threads_bind"),
            vllm_lora_ops=_choice_env(env, LORA_OPS_ENV, LORA_OPS_CHOICES, default("vllm_lora_ops")),
            vllm_compile=_flag_env(env, COMPILE_ENV, default("vllm_compile")),
            vllm_compact_json=_flag_env(env, "MOERGE_VLLM_COMPACT_JSON", default("vllm_compact_json")),
            vllm_env_passthrough=_names_env(env, "MOERGE_VLLM_ENV_PASSTHROUGH"),
            drain_s=_int_env(env, "MOERGE_DRAIN_S", default("drain_s")),
            merge_stale_after_s=_int_env(env, "MOERGE_MERGE_STALE_S", default("merge_stale_after_s")),
            store_orphan_age_s=_int_env(env, "MOERGE_STORE_ORPHAN_AGE_S", default("store_orphan_age_s")),
            metrics_token=env.get("MOERGE_METRICS_TOKEN") or None,
            metrics_dir=Path(env["PROMETHEUS_MULTIPROC_DIR"]).expanduser().resolve()
            if env.get("PROMETHEUS_MULTIPROC_DIR")
            else None,
            metrics_flush_s=_positive_float_env(env, "MOERGE_METRICS_FLUSH_S", default("metrics_flush_s")),
            metrics_keep_h=_positive_float_env(env, "MOERGE_METRICS_KEEP_H", default("metrics_keep_h")),
            session_secret=env.get("MOERGE_SESSION_SECRET") or None,
            admin_cookie_secure=_flag_env(env, "MOERGE_ADMIN_COOKIE_SECURE", default("admin_cookie_secure")),
        )
