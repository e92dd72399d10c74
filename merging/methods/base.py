"""What every merge method shares: typed parameters, the method record, the registry, ``merge_tensor``.

A merge method is a pure function over one tensor name at a time: it gets the inputs' tensors for that
name (full tensors, or task vectors δ_i = W_i − W_0 when ``task_vectors``), their per-input parameters
and the method's global parameters, and returns one tensor. Streaming, dtype of the output, adding W_0
back and writing shards are the executor's business, so each method stays small and testable.

Parameter names follow mergekit's (``weight``, ``density``, ``gamma``; ``normalize``, ``lambda``,
``rescale``) so a mergekit YAML's ``parameters`` can be passed through as they are.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from registry.errors import ValidationFailed
from registry.schemas import convert_params

# A sum of weights closer to 0 than this counts as 0 (mergekit's rule for its divisors).
ZERO_SUM = 1e-8


def require_param(condition: bool, param: str, reason: str) -> None:
    """Raise ValidationFailed naming ``param`` (e.g. ``parameters.lambda``, ``inputs[1].density``)."""
    if not condition:
        raise ValidationFailed(f"{param}: {reason}", param=param)


class MethodConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A method's global parameters (each with a default); subclasses add fields."""

    def check(self) -> None:
        """Raise ValidationFailed(param="parameters.<field>") when a value is out of range."""

    def check_inputs(self, inputs: Sequence[InputParams]) -> None:
        """Checks across all inputs that depend on the global parameters (e.g. a weight sum of 0 with
        ``normalize``); raise ValidationFailed(param="inputs")."""

    def digest(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self, order="sorted")).hexdigest()[:16]


class InputParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One input's parameters. ``weight`` is required in mergekit; here it defaults to 1."""

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


class MethodRegistry:
    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

    def register(self, method: MergeMethod) -> MergeMethod:
        """Validate and add one method; mistakes here are programming errors (ValueError)."""
        name = method.name
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise ValueError(f"merge method name must be a lower-case identifier, got {name!r}")
        if name in self._methods:
            raise ValueError(f"merge method {name!r} is registered twice")
        if not method.help.strip():
            raise ValueError(f"merge method {name!r}: give it a one-line help text")
        if not (isinstance(method.config_cls, type) and issubclass(method.config_cls, MethodConfig)):
            raise ValueError(f"merge method {name!r}: config_cls must subclass MethodConfig")
        if not (isinstance(method.input_cls, type) and issubclass(method.input_cls, InputParams)):
            raise ValueError(f"merge method {name!r}: input_cls must subclass InputParams")
        if not callable(method.fn):
            raise ValueError(f"merge method {name!r}: fn must be callable")
        if not isinstance(method.task_vectors, bool) or not isinstance(method.random, bool):
            raise ValueError(f"merge method {name!r}: task_vectors and random must be bools")
        # Every default must itself be valid, so an empty ``parameters`` always configures.
        method.config_cls().check()
        self._methods[name] = method
        return method

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def get(self, name: str) -> MergeMethod:
        if name not in self._methods:
            raise ValidationFailed(f"unknown merge method {name!r}; known: {', '.join(self.names())}", param="method")
        return self._methods[name]

    def configure(
        self, name: str, params: Mapping[str, Any] | None, inputs: Sequence[Mapping[str, Any]]
    ) -> tuple[MethodConfig, list[InputParams]]:
        """Typed, range-checked parameters for ``name`` from plain dicts (JSON / a mergekit YAML).

        ``params`` are the global ones, ``inputs`` one dict of per-input parameters per model (for task
        vector methods: per fine-tuned model, the base not counted). Errors name ``method``,
        ``parameters.<x>``, ``inputs`` or ``inputs[i].<x>``.
        """
        method = self.get(name)
        config: MethodConfig = convert_params(dict(params or {}), method.config_cls, "parameters")
        config.check()
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
