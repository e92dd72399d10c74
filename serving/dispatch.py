"""The app's engine when it serves with vLLM: vLLM for experts, the torch engine for what only it can run.

A token-level or weighted mixture runs in vLLM as one adapter slot where the main engine can place it
(``VLLMEngine.mixture_target``: a managed server running moerge's op, ``serving/vllm_mixtures.py``); elsewhere
(stock vLLM, a remote server) and for logit fusion (several experts decoding together), the request goes to an
in-process ``TorchEngine``, created on first use. Callers see one ``Engine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from typing import Any

from core.errors import ValidationFailed
from serving.engine import Capabilities, Engine, GenChunk, GenRequest, GenResult, Target, TokenTrace
from serving.torch_engine import TorchEngine


def answering_engine(engine: Engine, target: Target, *, fused: bool = False) -> str:
    """The name of the engine that runs a request on ``target`` (``fused``: logit fusion): the x-moerge-engine
    header and the spans' attribute. Beside vLLM, a mixture is vLLM's once it was placed there."""
    if not isinstance(engine, EngineSet):
        return engine.name
    if fused or (target.mixture is not None and not engine.main_serves_mixture(target)):
        return TorchEngine.name
    return engine.name


def answering_capabilities(engine: Engine, target: Target, *, fused: bool = False) -> Capabilities:
    """What the engine that runs a request on ``target`` can honour (see ``answering_engine``)."""
    if not isinstance(engine, EngineSet):
        return engine.capabilities
    if fused or (target.mixture is not None and not engine.main_serves_mixture(target)):
        return TorchEngine.capabilities
    return engine.main.capabilities


class EngineSet:
    """``Engine`` over a main engine plus a lazily created torch engine (see the module docstring)."""

    # mixtures, fused requests and traces run on the torch engine
    capabilities = Capabilities(token_mixtures=True, logit_fusion=True, traces=True)

    def __init__(self, main: Engine, torch_engine: TorchEngine | None = None) -> None:
        self.main = main
        self.name = main.name
        self._torch = torch_engine

    @property
    def torch(self) -> TorchEngine:
        if self._torch is None:
            self._torch = TorchEngine()
        return self._torch

    def main_serves_mixture(self, target: Target) -> bool:
        serves = getattr(self.main, "serves_mixture", None)
        return bool(serves is not None and serves(target))

    def on_torch(self, request: GenRequest) -> bool:
        """Logit fusion, and a mixture the main engine cannot run as a vLLM slot, run on the torch engine."""
        if request.fusion is not None:
            return True
        return request.target.mixture is not None and not self.main_serves_mixture(request.target)

    async def generate(self, requests: list[GenRequest]) -> list[GenResult | BaseException]:
        local = [i for i, r in enumerate(requests) if self.on_torch(r)]
        if not local:
            return await self.main.generate(requests)
        remote = [i for i in range(len(requests)) if i not in set(local)]
        results: list[GenResult | BaseException | None] = [None] * len(requests)
        local_out, remote_out = await asyncio.gather(
            self.torch.generate([requests[i] for i in local]),
            self.main.generate([requests[i] for i in remote]) if remote else _nothing(),
        )
        for i, out in zip(local, local_out, strict=True):
            results[i] = out
        for i, out in zip(remote, remote_out, strict=True):
            results[i] = out
        return [r for r in results if r is not None]

    def stream(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        return (self.torch if self.on_torch(request) else self.main).stream(request)

    async def trace(self, request: GenRequest, completion: str = "") -> TokenTrace:
        return await self.torch.trace(request, completion)

    async def forget(self, adapter_id: str, names: Collection[str]) -> None:
        await self.main.forget(adapter_id, names)
        if self._torch is not None:
            await self._torch.forget(adapter_id, names)

    async def status(self) -> list[dict[str, Any]]:
        local = await self._torch.status() if self._torch is not None else []
        return [*await self.main.status(), *local]

    async def close(self) -> None:
        try:
            await self.main.close()
        finally:
            if self._torch is not None:
                await self._torch.close()


async def _nothing() -> list[GenResult | BaseException]:
    return []


async def trace(engine: Engine, request: GenRequest, completion: str = "") -> TokenTrace:
    """The token-level trace of ``request`` on an engine that runs mixtures."""
    if not engine.capabilities.traces:
        raise ValidationFailed(f"the {engine.name} engine cannot trace token-level routes", param="trace")
    return await engine.trace(request, completion)
