"""What every merge method shares: typed parameters, the method record, the registry, ``merge_tensor``.

A merge method is a pure function over one tensor name at a time: it gets the inputs' tensors for that
name (full tensors, or task vectors δ_i = W_i − W_0 when ``task_vectors``), their per-input parameters
and the method's global parameters, and returns one tensor. Streaming, dtype of the output, adding W_0
back and writing shards are the executor's business, so each method stays small and testable.

Parameter names follow mergekit's (``weight``, ``density``, ``gamma``; ``normalize``, ``lambda``,
``rescale``) so a mergekit YAML's ``parameters`` can be passed through as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from core.errors import ValidationFailed
from core.schemas import convert_params
from core.strategies import ParamHelp, Registry, StrategyConfig, struct_params

# A sum of weights closer to 0 than this counts as 0 (mergekit's rule for its divisors).
ZERO_SUM = 1e-8


def require_param(condition: bool, param: str, reason: str) -> None:
    """Raise ValidationFailed naming ``param`` (e.g. ``parameters.lambda``, ``inputs[1].density``)."""
    if not condition:
        raise ValidationFailed(f"{param}: {reason}", param=param)


class MethodConfig(StrategyConfig, frozen=True):
    """A method's global parameters (each with a default and help); subclasses add fields and override
    ``check`` (raising ValidationFailed(param="parameters.<field>"))."""

    def check_inputs(self, inputs: Sequence[InputParams]) -> None:
        """Checks across all inputs that depend on the global parameters (e.g. a weight sum of 0 with
        ``normalize``); raise ValidationFailed(param="inputs")."""


class InputParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One input's parameters.

    weight: the input's weight in the sum (finite; required in mergekit, here it defaults to 1).
    """

    weight: float = 1.0

    def check(self, index: int) -> None:
        """Raise ValidationFailed(param=f"inputs[{index}].<field>") when a value is out of range."""
        require_param(math.isfinite(self.weight), f"inputs[{index}].weight", "must be a finite number")


def refuse_zero_weight_sum(normalize: bool, inputs: Sequence[InputParams]) -> None:
    """Normalizing by weights that sum to 0 means nothing: refuse it up front rather than divide by 0
    (mergekit's ``linear`` gives inf/NaN; its task arithmetic silently skips the normalization)."""
    total = math.fsum(p.weight for p in inputs)
    if normalize and abs(total) < ZERO_SUM:
        raise ValidationFailed(
            f"inputs: the weights sum to {total:g}, so normalize cannot divide by them; "
            "change the weights or set parameters.normalize to false",
            param="inputs",
        )


MergeFn = Callable[[Sequence[torch.Tensor], Sequence[InputParams], MethodConfig, torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``task_vectors`` True: ``fn`` receives the deltas δ_i = W_i − W_0 and returns the merged delta τ with
    ``lambda`` applied; the executor adds W_0. False (``linear``): ``fn`` receives the full tensors and
    returns the merged tensor. ``random`` True: ``fn`` needs a ``torch.Generator`` (the only source of
    randomness, so a merge is reproducible from its seed).
    """

    name: str
    help: str
    task_vectors: bool
    config_cls: type[MethodConfig]
    input_cls: type[InputParams]
    fn: MergeFn
    random: bool = False

    def defaults(self) -> MethodConfig:
        return self.config_cls()


class MethodRegistry(Registry[MergeMethod, MethodConfig]):
    """The merge methods. A subclass of the one strategy registry because a method also takes parameters
    per input (``input_cls``, checked by ``configure`` and listed as ``inputs[i].<x>``) and, unlike a
    router, is never built into an object: ``configure`` returns its typed parameters for the executor."""

    def __init__(self) -> None:
        super().__init__("merge method", config_base=MethodConfig, params_field="parameters", param="method")

    def check_entry(self, entry: MergeMethod) -> None:
        name = entry.name
        if not (isinstance(entry.input_cls, type) and issubclass(entry.input_cls, InputParams)):
            raise ValueError(f"merge method {name!r}: input_cls must subclass InputParams")
        if not callable(entry.fn):
            raise ValueError(f"merge method {name!r}: fn must be callable")
        if not isinstance(entry.task_vectors, bool) or not isinstance(entry.random, bool):
            raise ValueError(f"merge method {name!r}: task_vectors and random must be bools")
        # Every default must itself be valid, so an empty ``parameters`` always configures.
        entry.config_cls().check()

    def params(self, entry: MergeMethod) -> tuple[ParamHelp, ...]:
        return super().params(entry) + struct_params(entry.input_cls, "inputs[i].")

    def configure(
        self, name: str, params: Mapping[str, Any] | None, inputs: Sequence[Mapping[str, Any]]
    ) -> tuple[MethodConfig, list[InputParams]]:
        """Typed, range-checked parameters for ``name`` from plain dicts (JSON / a mergekit YAML).

        ``params`` are the global ones, ``inputs`` one dict of per-input parameters per model (for task
        vector methods: per fine-tuned model, the base not counted). Errors name ``method``,
        ``parameters.<x>``, ``inputs`` or ``inputs[i].<x>``.
        """
        method = self.get(name)
        config = self.config(name, dict(params or {}))
        if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
            raise ValidationFailed("inputs: expected a list of per-input parameters", param="inputs")
        if not inputs:
            what = "a task vector (a model besides the base)" if method.task_vectors else "a model"
            raise ValidationFailed(f"inputs: {name} needs at least one input, {what}", param="inputs")
        parsed: list[InputParams] = []
        for index, raw in enumerate(inputs):
            item: InputParams = convert_params(
                dict(raw) if isinstance(raw, Mapping) else raw, method.input_cls, f"inputs[{index}]"
            )
            item.check(index)
            parsed.append(item)
        config.check_inputs(parsed)
        return config, parsed


METHODS = MethodRegistry()


def merge_tensor(
    method: MergeMethod,
    tensors: Sequence[torch.Tensor],
    inputs: Sequence[InputParams],
    config: MethodConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``method`` on one tensor name: inputs upcast to float32, float32 out (the executor casts).

    ``tensors`` are deltas for task-vector methods, full tensors otherwise, in the order of ``inputs``.
    """
    if not tensors:
        raise ValueError(f"{method.name}: no tensors to merge")
    if len(tensors) != len(inputs):
        raise ValueError(f"{method.name}: {len(tensors)} tensors but {len(inputs)} input parameter sets")
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"{method.name}: tensors differ in shape: {[tuple(t.shape) for t in tensors]}")
    if not isinstance(config, method.config_cls):
        raise TypeError(f"{method.name}: config must be {method.config_cls.__name__}, got {type(config).__name__}")
    if any(not isinstance(p, method.input_cls) for p in inputs):
        raise TypeError(f"{method.name}: input parameters must be {method.input_cls.__name__}")
    if method.random and generator is None:
        raise ValueError(f"{method.name} is random: pass a seeded torch.Generator")
    # Methods never write into their inputs, so a float32 input can be passed through without a copy.
    upcast = [t.to(torch.float32) for t in tensors]
    return method.fn(upcast, inputs, config, generator).to(torch.float32)
