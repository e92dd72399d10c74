"""The app's engine when it serves with vLLM: vLLM for experts, the torch engine for what only it can run.

vLLM cannot mix several LoRA adapters per token (DESIGN.md: token-level mixtures inside vLLM are a later
step) nor decode several experts together (logit fusion), so a request whose target is a token-level
mixture, or a fused request, goes to an in-process ``TorchEngine``, created on first use; everything else
goes to the main engine. Callers see one ``Engine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from typing import Any

from core.errors import ValidationFailed
from serving.engine import Capabilities, Engine, GenChunk, GenRequest, GenResult, TokenTrace
from serving.torch_engine import TorchEngine


def needs_torch(request: GenRequest) -> bool:
    return request.target.mixture is not None or request.fusion is not None


def answering_engine(engine: Engine, *, torch_only: bool) -> str:
    """The name of the engine that runs a request (``torch_only``: a mixture or a fused request, which the app's
    ``EngineSet`` sends to its torch engine): the x-moerge-engine header and the spans' attribute."""
    return TorchEngine.name if torch_only and isinstance(engine, EngineSet) else engine.name


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

    async def generate(self, requests: list[GenRequest]) -> list[GenResult | BaseException]:
        local = [i for i, r in enumerate(requests) if needs_torch(r)]
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
        return (self.torch if needs_torch(request) else self.main).stream(request)

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
