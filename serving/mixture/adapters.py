"""Read PEFT LoRA adapter folders into plain tensors and stack several adapters of one base per module.

Only what a routed mixture can reproduce exactly is accepted: plain LoRA on linear layers. Anything that
changes the layer in another way (DoRA, embedding LoRA, LoRA biases, modules_to_save, trained biases, other
LoRA variants) is refused with an error naming the adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.lora import PEFT_PREFIX, pattern_value


class AdapterRefused(ValueError):
    """An adapter the mixture cannot apply exactly; the message names the adapter."""


@dataclass(frozen=True)
class LoraModuleWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoraAdapter:
    name: str
    path: Path
    modules: dict[str, LoraModuleWeights]  # base module path (e.g. model.layers.0.self_attn.q_proj) -> weights
    fingerprint: str = ""  # sha256 of the weight file and config: the key router artifacts are cached under
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraStack:
    """The adapters of one module, padded to a common rank: A [E, r_max, in], B [E, out, r_max].
    Padding is zeros, so B_e A_e is unchanged; ``ranks`` lets the kernel skip the padding."""

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor  # [E]
    ranks: list[int]  # true rank per adapter (0 where the adapter does not adapt this module)
    available: torch.Tensor  # [E] bool


# Config fields whose truthy value means a layer change a plain B·A mixture cannot reproduce.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias on lora_B",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "an Arrow router adapter",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layout)",
}


def refused(name: str, reason: str) -> AdapterRefused:
    return AdapterRefused(f"adapter {name!r}: {reason}; a token-level mixture cannot apply it exactly")


def target_linear(model: torch.nn.Module, module: str, owner: str) -> torch.nn.Linear:
    """The base's Linear layer at ``module``; AdapterRefused naming adapter ``owner`` when it is absent or not
    a Linear."""
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        layer = None
    if not isinstance(layer, torch.nn.Linear):
        what = "absent from the base" if layer is None else f"a {type(layer).__name__}, not a Linear"
        raise refused(owner, f"it targets {module}, which is {what}")
    return layer


def load_lora_adapter(path: Path | str, name: str | None = None) -> LoraAdapter:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` of a PEFT LoRA folder (float32)."""
    path = Path(path)
    name = name or path.name
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise refused(name, f"{path} lacks adapter_config.json or adapter_model.safetensors")
    raw_cfg = cfg_file.read_bytes()
    cfg: dict[str, Any] = json.loads(raw_cfg)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise refused(name, f"peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise refused(name, f"it uses {what}")
    if cfg.get("bias", "none") != "none":
        raise refused(name, f"it trains biases (bias={cfg.get('bias')!r})")

    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", 8))  # 8 is PEFT's default
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern: dict[str, Any] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = cfg.get("alpha_pattern") or {}

    tensors = load_file(str(weights_file))
    # The specific refusals first: an embedding LoRA also saves the embedding matrix itself.
    for key in sorted(tensors):
        if "lora_embedding_" in key:
            raise refused(name, f"it adapts an embedding ({key.removeprefix(PEFT_PREFIX)})")
        if "lora_magnitude_vector" in key:
            raise refused(name, f"it uses DoRA ({key.removeprefix(PEFT_PREFIX)})")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        rel = key.removeprefix(PEFT_PREFIX)
        module, _, leaf = rel.removesuffix(".weight").rpartition(".")
        if not rel.endswith(".weight") or leaf not in ("lora_A", "lora_B"):
            raise refused(name, f"it holds a tensor that is not a LoRA A/B weight ({key})")
        parts.setdefault(module, {})[leaf] = tensor

    modules: dict[str, LoraModuleWeights] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise refused(name, f"module {module} lacks lora_A or lora_B")
        A, B = ab["lora_A"].float(), ab["lora_B"].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise refused(
                name, f"module {module} has A {list(A.shape)} and B {list(B.shape)}, not [r, in] and [out, r]"
            )
        rank = int(A.shape[0])
        declared = pattern_value(rank_pattern, module)
        if rank != int(declared if declared is not None else r):
            raise refused(name, f"module {module} has rank {rank} but its config declares {declared or r}")
        a = pattern_value(alpha_pattern, module)
        mod_alpha = float(a) if a is not None else alpha
        # PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
        scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
        modules[module] = LoraModuleWeights(A.contiguous(), B.contiguous(), scale)
    if not modules:
        raise refused(name, "it holds no LoRA weights")
    digest = hashlib.sha256(raw_cfg + weights_file.read_bytes()).hexdigest()
    return LoraAdapter(name=name, path=path, modules=modules, fingerprint=digest, config=cfg)


def stack_module(
    adapters: Sequence[LoraAdapter], module: str, in_features: int, out_features: int, dtype: torch.dtype
) -> LoraStack:
    """Stack ``module`` of every adapter (zeros and unavailable where an adapter lacks it)."""
    present = [a.modules.get(module) for a in adapters]
    for adapter, w in zip(adapters, present, strict=True):
        if w is not None and (w.A.shape[1] != in_features or w.B.shape[0] != out_features):
            raise refused(
                adapter.name,
                f"module {module} maps {w.A.shape[1]} -> {w.B.shape[0]} features but the base layer maps "
                f"{in_features} -> {out_features}",
            )
    r_max = max(w.rank for w in present if w is not None)
    n = len(adapters)
    A = torch.zeros(n, r_max, in_features, dtype=dtype)
    B = torch.zeros(n, out_features, r_max, dtype=dtype)
    scale = torch.zeros(n, dtype=dtype)
    ranks = [0] * n
    for e, w in enumerate(present):
        if w is None:
            continue
        A[e, : w.rank] = w.A
        B[e, :, : w.rank] = w.B
        scale[e] = w.scale
        ranks[e] = w.rank
    available = torch.tensor([w is not None for w in present], dtype=torch.bool)
    return LoraStack(A=A, B=B, scale=scale, ranks=ranks, available=available)
