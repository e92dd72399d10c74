"""How moerge runs vLLM servers: ``VLLMConfig`` (ports, limits, timeouts, what managed servers start with) and
``child_env``, the environment a managed server process gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.lora import VALID_LORA_RANKS
from serving.vllm_plugin import COMPILE_ENV, LORA_OPS_CHOICES, LORA_OPS_ENV
from serving.vllm_process import cpu_bind_list, server_env


@dataclass(frozen=True)
class VLLMConfig:
    port_start: int = field(
        default=8100, metadata={"help": "first port tried for managed servers; each takes the next free one"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address managed servers bind"})
    max_model_len: int = field(default=2048, metadata={"help": "--max-model-len: longest prompt + completion"})
    max_loras: int = field(default=8, metadata={"help": "--max-loras: distinct adapters in one batch"})
    max_lora_rank: int = field(
        default=16,
        metadata={
            "help": "--max-lora-rank; must be >= every adapter's r; vLLM accepts only "
            + ", ".join(map(str, VALID_LORA_RANKS))
            + " (a larger Target.max_lora_rank is rounded up to one of these)"
        },
    )
    kv_cache_gib: float = field(default=2, metadata={"help": "VLLM_CPU_KVCACHE_SPACE: KV cache per server, GiB"})
    max_servers: int = field(
        default=3,
        metadata={
            "help": "managed servers running at once (each holds its model and KV cache); starting one more "
            "stops the least recently used one that is idle and has not served for keep_warm_s"
        },
    )
    keep_warm_s: float = field(
        default=60,
        metadata={
            "help": "a managed server that served (or became ready) within this long is never stopped to make "
            "room for another base: round-robin over more bases than max_servers waits instead of restarting a "
            "server (30-60 s each) on every request"
        },
    )
    server_wait_s: float = field(
        default=30,
        metadata={
            "help": "how long a request waits for room to start its base's server (max_servers running, each busy "
            "or warm) before EngineUnavailable (503) with a Retry-After of when a server becomes stoppable"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "--dtype; float32 is 3-5x faster than bf16 on this CPU"})
    cpu_threads_bind: str = field(
        default="all",
        metadata={
            "help": "VLLM_CPU_OMP_THREADS_BIND for managed servers: `all` binds the worker's OpenMP threads to "
            "every CPU this process may use; vLLM's own `auto` reserves one core for its scheduler, which "
            "on a 2-core machine halves generation speed; `nobind`, or an explicit list such as `0-3`"
        },
    )
    lora_ops: str = field(
        default="grouped",
        metadata={
            "help": "multi-LoRA ops inside managed CPU servers: `grouped` (serving/lora_ops.py, no per-token "
            "copy of the adapter weights; about 10x faster LoRA matmuls in prefill here) or `vllm` (vLLM's own)"
        },
    )
    compile: bool = field(
        default=True,
        metadata={
            "help": "managed CPU servers keep vLLM's compiled model with LoRA on (serving/vllm_compile.py; vLLM "
            "itself runs eager whenever LoRA is enabled on CPU): a decode step about 30% faster; the first start of "
            "a model spends a minute or two compiling (inductor's cache makes later starts quicker)"
        },
    )
    compact_json: bool = field(
        default=True,
        metadata={
            "help": "structured outputs (JSON answers, tool arguments) without free whitespace between tokens "
            "(--structured-outputs-config disable_any_whitespace)"
        },
    )
    startup_timeout_s: float = field(default=300, metadata={"help": "a server not healthy after this is killed"})
    request_timeout_s: float = field(
        default=600, metadata={"help": "longest wait for a response (between stream chunks when streaming)"}
    )
    health_interval_s: float = field(default=5, metadata={"help": "seconds between health checks of each server"})
    health_failures_before_restart: int = field(
        default=3, metadata={"help": "consecutive failed health checks after which a live server is restarted"}
    )
    remote_servers: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "base id -> URL of a vLLM OpenAI server elsewhere: no process is started; adapters are "
            "loaded by path through its /v1/load_lora_adapter, so their folders must be visible to that server"
        },
    )
    log_dir: Path | None = field(
        default=None, metadata={"help": "where each server's stdout/stderr goes (default: <tmp>/moerge-vllm)"}
    )
    mixture_dir: Path | None = field(
        default=None,
        metadata={
            "help": "where mixtures served as one vLLM adapter slot are written (default: <log_dir>/../mixtures)"
        },
    )
    wait_for_start: bool = field(
        default=True,
        metadata={
            "help": "a request that triggers a base's first start waits for it (up to startup_timeout_s); "
            "otherwise it gets EngineUnavailable at once. Restarts never make requests wait"
        },
    )
    max_connections: int = field(default=256, metadata={"help": "HTTP connection pool size (concurrent requests)"})
    terminate_timeout_s: float = field(default=15, metadata={"help": "SIGTERM grace before SIGKILL on close"})
    extra_args: tuple[str, ...] = field(default=(), metadata={"help": "more arguments for managed servers"})
    env_passthrough: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "names of more environment variables managed servers inherit, beyond the allow-list "
            "(serving/vllm_process.py: CHILD_ENV_NAMES, CHILD_ENV_PREFIXES); nothing else reaches them"
        },
    )

    def __post_init__(self) -> None:
        if self.max_lora_rank not in VALID_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VALID_LORA_RANKS}, got {self.max_lora_rank}")
        if self.lora_ops not in LORA_OPS_CHOICES:
            raise ValueError(f"lora_ops must be one of {LORA_OPS_CHOICES}, got {self.lora_ops!r}")
        for name in (
            "max_model_len",
            "max_loras",
            "startup_timeout_s",
            "request_timeout_s",
            "health_interval_s",
            "max_servers",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("keep_warm_s", "server_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


def child_env(config: VLLMConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a managed server of ``config`` starts with (allow-listed: see ``server_env``)."""
    return server_env(
        config.kv_cache_gib,
        {
            "VLLM_CPU_OMP_THREADS_BIND": cpu_bind_list(config.cpu_threads_bind),
            LORA_OPS_ENV: config.lora_ops,
            COMPILE_ENV: "1" if config.compile else "0",
        },
        passthrough=config.env_passthrough,
        environ=environ,
    )
