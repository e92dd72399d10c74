"""Token-level and weighted mixtures served by a managed vLLM server, as one adapter slot each.

A ``TokenMixture`` whose router can run in moerge's vLLM op (``TokenMixture.slot_params``) is written once as a
slot folder (``serving/mixture/slot.py``: the members' LoRA weights and the router's state in one PEFT adapter)
and then served like any adapter of its base: batched with plain-adapter, base and other mixture requests,
streamed, compiled or eager, in vLLM's paged KV cache. A request's own vector (GLIDER's bias, a weighted
mixture's weights) travels as ``vllm_xargs`` (``serving/vllm_openai.py``) and reaches the op per token, so any
number of distinct vectors can be in flight at once; the slots themselves count against ``--max-loras``.

Only where moerge's op runs: a managed server (not a remote one), with moerge's LoRA ops, on vLLM's CPU platform.
Elsewhere (stock vLLM on a GPU machine, a remote server) the mixture keeps the torch engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from serving.engine import Target
from serving.vllm_config import VLLMConfig

log = logging.getLogger(__name__)


class MixtureSlots:
    """Writes and remembers the slot targets of one engine's mixtures."""

    def __init__(self, config: VLLMConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self._targets: dict[str, Target] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._op_runs: bool | None = None

    async def prepare(self) -> None:
        """Ask vLLM's platform now, off the event loop (importing it takes seconds), so that :meth:`places`
        answers at once; the app calls this at start."""
        if self.config.lora_ops == "grouped" and self._op_runs is None:
            from serving import vllm_plugin

            self._op_runs = await asyncio.to_thread(vllm_plugin.on_cpu_platform)

    def op_runs(self) -> bool:
        """Whether managed servers run moerge's op: its LoRA ops asked for, on vLLM's CPU platform."""
        if self.config.lora_ops != "grouped":
            return False
        if self._op_runs is None:  # not prepared: ask now (once)
            from serving import vllm_plugin

            self._op_runs = vllm_plugin.on_cpu_platform()
        return self._op_runs

    def places(self, target: Target) -> bool:
        """Whether ``target``'s mixture runs here as a slot (else the torch engine runs it)."""
        mixture = target.mixture
        return (
            mixture is not None
            and bool(mixture.slot_params)
            and target.base_id not in self.config.remote_servers
            and self.op_runs()
        )

    async def target(self, target: Target) -> Target | None:
        """The slot target that serves ``target``'s mixture here, or None when this engine cannot."""
        mixture = target.mixture
        if mixture is None or not self.places(target):
            return None
        found = self._targets.get(mixture.key)
        if found is not None:
            return found
        lock = self._locks.setdefault(mixture.key, asyncio.Lock())
        async with lock:
            found = self._targets.get(mixture.key)
            if found is None:
                found = await asyncio.to_thread(self._write, target)
                self._targets[mixture.key] = found
        return found

    def _write(self, target: Target) -> Target:
        import torch

        from serving.mixture import load_lora_adapter
        from serving.mixture.slot import SlotRouting, write_slot

        mixture = target.mixture
        assert mixture is not None
        adapters = [load_lora_adapter(folder, slug) for _, slug, folder in mixture.adapters]
        params: dict[str, Any] = json.loads(mixture.slot_params)
        ranks = tuple(max(w.rank for w in a.modules.values()) for a in adapters)
        routing = SlotRouting(ranks=ranks, **params)
        states: list[dict[str, torch.Tensor]] = [
            {k: torch.as_tensor(v) for k, v in state.items()} for state in mixture.states
        ]
        if routing.routed and not states:  # a router fitted from the weights alone (Arrow)
            router = mixture.make_router()
            states = [router.fit_adapter(a) for a in adapters]
        digest = hashlib.sha256(mixture.key.encode() + mixture.slot_params.encode())
        for state in states:
            for module in sorted(state):
                digest.update(module.encode() + state[module].detach().to(torch.float32).numpy().tobytes())
        name = f"mixture-{digest.hexdigest()[:20]}"
        folder = write_slot(self.root / name, adapters, states, routing, base_model=str(target.base_dir))
        log.info(
            "mixture %s of %d adapters written as vLLM slot %s (rank %d)",
            mixture.composition,
            len(adapters),
            name,
            routing.rank,
        )
        return Target(
            base_id=target.base_id,
            base_dir=target.base_dir,
            adapter_id=name,
            adapter_dir=folder,
            max_lora_rank=routing.rank,
            served_name=target.served_name,
            chat_template=target.chat_template,
            tool_parser=target.tool_parser,
        )
