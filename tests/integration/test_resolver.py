"""moerge's vLLM LoRA resolver (the `resolver/` package, installed into .venv by scripts/setup.sh as on a GPU
machine) against a real moerge server: names, the sha256 check, the fetch scope, the cache bound. A vLLM server
using it is the next step (issue 22)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moerge_vllm_resolver import MoergeResolver, config_from_env, register
from moerge_vllm_resolver.fetch import FetchConfig, Fetcher, FetchError
from vllm.lora.resolver import LoRAResolverRegistry

from registry import db
from registry.keys import ApiKeyService
from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register as register_expert
from tests.fixtures.live import serve
from tests.fixtures.tiny import build_tiny_lora


def _key(database_url: str, scope: str) -> str:
    async def create() -> str:
        engine = db.make_engine(database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                return (await ApiKeyService(session).create(f"{scope}-key", [scope]))[1]
        finally:
            await engine.dispose()

    return asyncio.run(create())


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = registry_env.settings
    register_expert(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register_expert(settings, tiny_lora, ExpertSpec(slug="lora-a", base="tiny-base"))
    other = build_tiny_lora(tiny_base, tmp_path / "lora-b", seed=7)
    register_expert(settings, other, ExpertSpec(slug="lora-b", base="tiny-base"))
    with serve(settings, TorchEngine()) as url:
        config = FetchConfig(url=url, key=_key(settings.database_url, "fetch"), cache_dir=tmp_path / "cache")
        yield {"url": url, "config": config, "env": registry_env, "folders": {"lora-a": tiny_lora, "lora-b": other}}


def _same_files(folder: Path, source: Path) -> bool:
    names = {p.name for p in source.iterdir() if p.is_file()}
    return {p.name for p in folder.iterdir()} == names and all(
        (folder / n).read_bytes() == (source / n).read_bytes() for n in names
    )


def test_fetches_by_slug_id_and_content_bound_name(live: dict[str, Any]) -> None:
    fetcher = Fetcher(live["config"])
    found = asyncio.run(fetcher.fetch("lora-a"))
    assert found is not None
    manifest, folder = found
    assert _same_files(folder, live["folders"]["lora-a"]) and folder.name == manifest.sha256
    by_id = asyncio.run(fetcher.fetch(manifest.expert_id))
    pinned = asyncio.run(fetcher.fetch(f"lora-a@{manifest.sha256[:12]}"))
    assert by_id is not None and pinned is not None and by_id[1] == pinned[1] == folder
    assert asyncio.run(fetcher.fetch("lora-a@" + "0" * 12)) is None  # bound to content it does not have
    assert asyncio.run(fetcher.fetch("nobody")) is None
    assert asyncio.run(fetcher.fetch("tiny-base")) is None  # a base is not an adapter

    resolver = MoergeResolver(fetcher)
    request = asyncio.run(resolver.resolve_lora("tiny-base", "lora-a"))
    again = asyncio.run(resolver.resolve_lora("tiny-base", f"lora-a@{manifest.sha256[:16]}"))
    assert request is not None and again is not None
    assert request.lora_path == str(folder) and request.lora_int_id == again.lora_int_id > 0


def test_a_tampered_file_is_refused_and_nothing_cached(live: dict[str, Any]) -> None:
    fetcher = Fetcher(live["config"])
    env: RegistryEnv = live["env"]
    found = asyncio.run(fetcher.fetch("lora-b"))
    assert found is not None
    manifest, folder = found
    _, _, sha = next(f for f in manifest.files if f[0] == "adapter_config.json")
    blob = env.store.blob_path(sha)
    data = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(data.replace(b"lora", b"LORA", 1))  # the store's bytes no longer match the manifest
    fresh = Fetcher(dataclasses.replace(live["config"], cache_dir=folder.parent.parent / "cache2"))
    with pytest.raises(FetchError, match="sha256"):
        asyncio.run(fresh.fetch("lora-b"))
    assert not (folder.parent.parent / "cache2").exists() or not any((folder.parent.parent / "cache2").iterdir())
    assert asyncio.run(MoergeResolver(fresh).resolve_lora("tiny-base", "lora-b")) is None


def test_only_a_fetch_key_fetches(live: dict[str, Any]) -> None:
    query = _key(live["env"].settings.database_url, "query")
    with pytest.raises(FetchError, match="403"):
        asyncio.run(Fetcher(dataclasses.replace(live["config"], key=query)).fetch("lora-a"))


def test_the_cache_is_bounded_but_keeps_what_the_server_holds(live: dict[str, Any]) -> None:
    tight = dataclasses.replace(live["config"], max_cache_bytes=1)  # smaller than any adapter
    first = Fetcher(tight)
    a = asyncio.run(first.fetch("lora-a"))
    b = asyncio.run(first.fetch("lora-b"))
    assert a is not None and b is not None and a[1].is_dir() and b[1].is_dir()  # both held by this server
    restarted = Fetcher(tight)  # a new server process holds nothing yet
    b_again = asyncio.run(restarted.fetch("lora-b"))
    assert b_again is not None and b_again[1].is_dir() and not a[1].exists()  # the unheld one went


def test_register_needs_url_and_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config_from_env({}) is None  # not configured: inactive
    with pytest.raises(ValueError, match="MOERGE_RESOLVER_KEY"):
        config_from_env({"MOERGE_RESOLVER_URL": "http://x"})
    monkeypatch.setenv("MOERGE_RESOLVER_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("MOERGE_RESOLVER_KEY", "k")
    monkeypatch.setenv("MOERGE_RESOLVER_CACHE", str(tmp_path))
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    register()
    assert LoRAResolverRegistry.get_supported_resolvers() == {"moerge"}
