"""moerge's LoRA resolver for vLLM: a vLLM server anywhere serves the adapters of a moerge registry.

Installed into the vLLM environment (``pip install ./resolver``), it registers through vLLM's
``vllm.general_plugins`` entry point. It is active when the server's environment sets ``MOERGE_RESOLVER_URL``
(moerge's base URL) and ``MOERGE_RESOLVER_KEY`` (a key with the `fetch` scope); vLLM asks resolvers only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Files are cached under ``MOERGE_RESOLVER_CACHE`` (default
``~/.cache/moerge-resolver``), at most ``MOERGE_RESOLVER_CACHE_MB`` (10240) of them; adapters this server was
given are never evicted.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib
from pathlib import Path
from typing import Any

from moerge_vllm_resolver.fetch import FetchConfig, Fetcher, FetchError

__all__ = ["FetchConfig", "FetchError", "Fetcher", "MoergeResolver", "config_from_env", "register"]

log = logging.getLogger("vllm.moerge_resolver")
RESOLVER_NAME = "moerge"


def config_from_env(environ: dict[str, str] | None = None) -> FetchConfig | None:
    """The resolver's settings, or None when ``MOERGE_RESOLVER_URL`` is not set."""
    env = dict(os.environ if environ is None else environ)
    url = env.get("MOERGE_RESOLVER_URL", "").rstrip("/")
    if not url:
        return None
    key = env.get("MOERGE_RESOLVER_KEY", "")
    if not key:
        raise ValueError("MOERGE_RESOLVER_URL is set but MOERGE_RESOLVER_KEY (a key with the fetch scope) is not")
    cache = Path(env.get("MOERGE_RESOLVER_CACHE") or Path.home() / ".cache" / "moerge-resolver").expanduser()
    try:
        max_mb = int(env.get("MOERGE_RESOLVER_CACHE_MB") or 10240)
    except ValueError as exc:
        raise ValueError("MOERGE_RESOLVER_CACHE_MB must be an integer") from exc
    return FetchConfig(url=url, key=key, cache_dir=cache, max_cache_bytes=max_mb << 20)


@functools.cache
def _resolver_class() -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class MoergeResolver(LoRAResolver):
        """vLLM asks it for a model name it does not know: the adapter of that name in moerge's registry."""

        def __init__(self, fetcher: Fetcher) -> None:
            self.fetcher = fetcher

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                found = await self.fetcher.fetch(lora_name)
            except FetchError as exc:
                log.warning("moerge resolver: %s refused: %s", lora_name, exc)
                return None
            if found is None:
                return None
            manifest, folder = found
            # The same content always gets the same id, another content another one. (vLLM 0.32's OpenAI server
            # replaces it with its own counter when it resolves a name; callers using the request directly keep it.)
            lora_id = zlib.crc32(manifest.sha256.encode()) & 0x7FFFFFFF or 1
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(folder))

    return MoergeResolver


def __getattr__(name: str) -> Any:
    if name == "MoergeResolver":  # built on first use: importing this package must not import vLLM
        return _resolver_class()
    raise AttributeError(name)


def register() -> None:
    """vLLM's plugin hook: register the resolver when the environment configures it."""
    config = config_from_env()
    if config is None:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _resolver_class()(Fetcher(config)))
    log.info("moerge resolver: adapters from %s, cached in %s", config.url, config.cache_dir)
