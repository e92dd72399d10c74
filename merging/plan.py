"""A merge plan: the checked request plus its inputs' folders, checked against each other before any work.

Everything that can be wrong with a merge is found here from config files and safetensors headers alone:
architectures or shapes that differ, adapters of different bases, a task-vector method without a base,
an output that the inputs cannot make. The executor then only computes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from core.errors import MoergeError, ValidationFailed
from core.lora import lora_rank_for
from merging.config import CheckedRequest
from merging.tensor_io import NAME_TO_TORCH
from registry.inspect import (
    FolderInspection,
    check_adapter_fits_base,
    check_finetune_fits_base,
    inspect_folder,
    split_adapter_keys,
)

OUTPUT_HEAD = "lm_head.weight"  # absent from models that tie it to the input embeddings


@dataclass(frozen=True)
class ModelRef:
    """One model of the request, found: its folder and, when registered, its ids."""

    ref: str  # as the request names it (slug, alias, id or path)
    folder: Path
    expert_id: uuid.UUID | None = None
    base_id: uuid.UUID | None = None  # the registered base of an adapter or finetune


@dataclass
class PlannedModel:
    ref: ModelRef
    param: str  # the request field naming it: base_model or models[i].model
    insp: FolderInspection
    aliases: dict[str, str] = field(default_factory=dict)  # tensor name -> the stored tensor that serves it

    @property
    def is_lora(self) -> bool:
        return self.insp.kind == "adapter"

    @property
    def label(self) -> str:
        return self.ref.ref


@dataclass
class MergePlan:
    checked: CheckedRequest
    base: PlannedModel | None
    inputs: list[PlannedModel]
    out_dtype: torch.dtype
    rank: int | None = None  # lora output
    lora_modules: list[str] = field(default_factory=list)  # lora / cat outputs: the modules to write

    @property
    def method_name(self) -> str:
        return self.checked.method.name

    @property
    def output_format(self) -> str:
        return self.checked.output.format

    @property
    def reference(self) -> PlannedModel:
        """Where the output's config and tokenizer come from: the base, else the first input."""
        return self.base if self.base is not None else self.inputs[0]

    def summary(self) -> dict[str, Any]:
        """What the model card and the job record say about the merge: every parameter as used, defaults
        included, so the record alone reproduces it."""
        req = self.checked.request
        return {
            "merge_method": self.method_name,
            "base_model": self.base.label if self.base else None,
            "models": [
                {"model": m.label, "parameters": msgspec.to_builtins(params)}
                for m, params in zip(self.inputs, self.checked.inputs, strict=True)
            ],
            "parameters": msgspec.to_builtins(self.checked.config),
            "dtype": str(self.out_dtype).removeprefix("torch."),
            "output": {"format": self.output_format, **({"rank": self.rank} if self.rank else {})},
            "seed": req.seed,
        }


def plan_merge(checked: CheckedRequest, base: ModelRef | None, inputs: list[ModelRef]) -> MergePlan:
    """Inspect every folder and check the inputs fit each other and the method; no tensor is read."""
    method = checked.method
    output = checked.output
    planned = [_inspect(ref, checked.model_param(i)) for i, ref in enumerate(inputs)]
    loras = [m for m in planned if m.is_lora]
    base_model = _inspect(base, "base_model") if base is not None else None
    if base_model is not None and base_model.is_lora:
        raise ValidationFailed(f"base_model: {base_model.label} is a LoRA adapter, not a model", param="base_model")

    for m in loras:
        if m.insp.use_dora:
            raise ValidationFailed(
                f"{m.param}: {m.label} is a DoRA adapter; its magnitude vectors do not merge as task vectors",
                param=m.param,
            )
    _check_one_base(planned, base_model)
    lora_bases = {m.ref.base_id for m in loras}
    if len(lora_bases) > 1 or (None in lora_bases and base_model is None and loras):
        raise ValidationFailed(
            "models: the adapters are on different bases (or their base is unknown); "
            "merge adapters of one base, and name it in base_model",
            param="models",
        )
    if base_model is None and (method.task_vectors or loras):
        why = "merges task vectors (model - base)" if method.task_vectors else "adds adapter deltas to a base"
        raise ValidationFailed(f"base_model: {method.name} {why}; give base_model", param="base_model")

    reference = base_model if base_model is not None else planned[0]
    for m in planned:
        if m is not reference:
            _check_fits(m, reference)
            if not m.is_lora:
                _match_output_head(m, reference)

    plan = MergePlan(checked, base_model, planned, _out_dtype(checked, reference))
    if output.format in ("lora", "cat"):
        _plan_lora_output(plan)
    return plan


def _plan_lora_output(plan: MergePlan) -> None:
    checked = plan.checked
    for m in plan.inputs:
        if not m.is_lora:
            raise ValidationFailed(
                f"output.format: a {checked.output.format} output needs LoRA adapters as inputs; "
                f"{m.label} ({m.param}) is a full model",
                param="output.format",
            )
        modules, others = split_adapter_keys(m.insp.tensors)
        if others or any(mod.embedding for mod in modules.values()):
            raise ValidationFailed(
                f"{m.param}: {m.label} saves full tensors or embedding LoRAs, which a LoRA output cannot "
                "hold; merge to a full model (output.format: full)",
                param=m.param,
            )
        if (m.insp.adapter_config or {}).get("fan_in_fan_out"):
            raise ValidationFailed(f"{m.param}: fan_in_fan_out adapters cannot be merged into a LoRA", param=m.param)
    if not checked.method.task_vectors and not getattr(checked.config, "normalize", True):
        raise ValidationFailed(
            "parameters.normalize: a linear merge into a LoRA must normalize (else it scales the base too)",
            param="parameters.normalize",
        )
    plan.lora_modules = sorted({mod for m in plan.inputs for mod in split_adapter_keys(m.insp.tensors)[0]})
    if checked.output.format == "lora":
        ranks = [r for m in plan.inputs for r in (m.insp.r, *m.insp.rank_pattern.values()) if r]
        plan.rank = checked.output.rank or lora_rank_for(max(ranks, default=8))


def _check_one_base(planned: list[PlannedModel], base_model: PlannedModel | None) -> None:
    """Registered inputs must descend from base_model (its id, or its own base when it is a finetune);
    without a base_model, those with a declared base must share it. A task vector taken against another base
    is noise. (Without a base_model, models registered as bases themselves may be averaged if they fit.)"""

    def root(ref: ModelRef) -> uuid.UUID | None:
        return ref.base_id or ref.expert_id  # a base model is its own root

    if base_model is not None:
        allowed = {base_model.ref.expert_id, base_model.ref.base_id} - {None}
        for m in planned:
            found = root(m.ref)
            if allowed and found is not None and found not in allowed:
                what = "an adapter" if m.is_lora else "a model"
                raise ValidationFailed(
                    f"{m.param}: {m.label} is {what} of another base than base_model {base_model.label}",
                    param=m.param,
                )
        return
    roots = {m.ref.base_id for m in planned} - {None}
    if len(roots) > 1:
        raise ValidationFailed(
            "models: the inputs are on different bases; merge models of one base, and name it in base_model",
            param="models",
        )


def _match_output_head(model: PlannedModel, reference: PlannedModel) -> None:
    """A model with tied embeddings stores no lm_head: where the reference has one, that model's head is its
    input embedding. The opposite (an own head where the reference ties it) has nowhere to go: refused."""
    head = OUTPUT_HEAD
    has, wanted = head in model.insp.tensors, head in reference.insp.tensors
    if has == wanted:
        return
    if has:
        raise ValidationFailed(
            f"{model.param}: {model.label} has its own {head} but {reference.label} ties it to the input "
            "embeddings, so the merged model could not hold it; merge onto a base with its own lm_head",
            param=model.param,
        )
    shape = reference.insp.tensors[head].shape
    embeddings = [
        name
        for name, info in model.insp.tensors.items()
        if info.shape == shape and "emb" in name.rsplit(".", 2)[-2] and name.endswith(".weight")
    ]
    if len(embeddings) != 1:
        raise ValidationFailed(
            f"{model.param}: {model.label} has no {head} and no single input embedding of its shape to tie it to",
            param=model.param,
        )
    model.aliases[head] = embeddings[0]


def _check_fits(model: PlannedModel, reference: PlannedModel) -> None:
    check = check_adapter_fits_base if model.is_lora else check_finetune_fits_base
    _relabel(model.param, lambda: check(model.insp, reference.insp, base_slug=reference.label), f"{model.label}: ")


def _inspect(ref: ModelRef, param: str) -> PlannedModel:
    insp = _relabel(param, lambda: inspect_folder(ref.folder), prefix=f"{ref.ref}: ")
    return PlannedModel(ref, param, insp)


def _relabel(param: str, check: Callable[[], Any], prefix: str = "") -> Any:
    """Run a registry check; its error names the request field, keeping the file detail in the message."""
    try:
        return check()
    except MoergeError as exc:
        detail = f" ({exc.param})" if exc.param and exc.param != param else ""
        raise ValidationFailed(f"{param}: {prefix}{exc.message}{detail}", param=param) from exc


def _out_dtype(checked: CheckedRequest, reference: PlannedModel) -> torch.dtype:
    name = checked.output_dtype or reference.insp.dtype or "float32"
    if name not in NAME_TO_TORCH:
        raise ValidationFailed(
            f"dtype: {reference.label} is stored as {name}; give dtype (float32, bfloat16 or float16)", param="dtype"
        )
    return NAME_TO_TORCH[name]
