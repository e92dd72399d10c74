"""Merge methods as pure per-tensor functions, registered by name in ``METHODS``.

Importing this package registers them all: ``linear`` and the six task-vector methods, which are one
function (``generalized_task_arithmetic``) configured by sparsifier and sign consensus, with mergekit
0.1.5's defaults (``mergekit/merge_methods/registry.py``):

| method           | sparsify           | sign consensus | normalize | rescale |
| ---------------- | ------------------ | -------------- | --------- | ------- |
| task_arithmetic  | none               | no             | false     | -       |
| ties             | magnitude          | sum            | true      | false   |
| breadcrumbs      | magnitude_outliers | no             | false     | false   |
| breadcrumbs_ties | magnitude_outliers | sum            | false     | false   |
| dare_linear      | random             | no             | false     | true    |
| dare_ties        | random             | sum            | false     | true    |

``lambda`` defaults to 1 everywhere, ``density`` to 1, ``gamma`` (breadcrumbs) to 0.01; ``linear``
normalizes by default.
"""

from __future__ import annotations

from merging.methods.base import (
    METHODS,
    InputParams,
    MergeFn,
    MergeMethod,
    MethodConfig,
    MethodRegistry,
    merge_tensor,
)
from merging.methods.linear import LinearConfig, linear
from merging.methods.sparsify import Sparsification
from merging.methods.task_arithmetic import (
    BreadcrumbsInputParams,
    BreadcrumbsTiesConfig,
    Consensus,
    DareConfig,
    DareTiesConfig,
    DensityInputParams,
    SparseConfig,
    TaskArithmeticConfig,
    TiesConfig,
    generalized_task_arithmetic,
)

__all__ = [
    "METHODS",
    "InputParams",
    "MergeFn",
    "MergeMethod",
    "MethodConfig",
    "MethodRegistry",
    "merge_tensor",
]


def _task_vector_method(
    name: str,
    help: str,
    sparsification: Sparsification,
    consensus: Consensus | None,
    config_cls: type[TaskArithmeticConfig],
    input_cls: type[InputParams],
) -> MergeMethod:
    # The config's idea of sign consensus (used to validate weights) must be the function's.
    if config_cls.elects_sign != (consensus is not None):
        raise ValueError(f"{name}: {config_cls.__name__}.elects_sign disagrees with consensus={consensus!r}")
    return MergeMethod(
        name=name,
        help=help,
        task_vectors=True,
        config_cls=config_cls,
        input_cls=input_cls,
        fn=generalized_task_arithmetic(sparsification, consensus),
        random=sparsification is Sparsification.random,
    )


METHODS.register(
    MergeMethod(
        name="linear",
        help="Weighted average of the models' tensors, Σ w·W / Σ w (normalize, default true).",
        task_vectors=False,
        config_cls=LinearConfig,
        input_cls=InputParams,
        fn=linear,
    )
)
METHODS.register(
    _task_vector_method(
        "task_arithmetic",
        "W0 + lambda·Σ w·δ: add the weighted task vectors to the base (normalize divides by Σ w).",
        Sparsification.none,
        None,
        TaskArithmeticConfig,
        InputParams,
    )
)
METHODS.register(
    _task_vector_method(
        "ties",
        "TIES: keep the top density of each |δ|, elect a sign per entry by mass, average the agreeing deltas.",
        Sparsification.magnitude,
        "sum",
        TiesConfig,
        DensityInputParams,
    )
)
METHODS.register(
    _task_vector_method(
        "breadcrumbs",
        "Model Breadcrumbs: drop the largest gamma and the smallest of each |δ|, keeping density; add Σ w·δ.",
        Sparsification.magnitude_outliers,
        None,
        SparseConfig,
        BreadcrumbsInputParams,
    )
)
METHODS.register(
    _task_vector_method(
        "breadcrumbs_ties",
        "Model Breadcrumbs' outlier-and-small trim, then TIES' sign election and merge of agreeing deltas.",
        Sparsification.magnitude_outliers,
        "sum",
        BreadcrumbsTiesConfig,
        BreadcrumbsInputParams,
    )
)
METHODS.register(
    _task_vector_method(
        "dare_linear",
        "DARE: keep each delta entry with probability density (seeded), rescale, add Σ w·δ.",
        Sparsification.random,
        None,
        DareConfig,
        DensityInputParams,
    )
)
METHODS.register(
    _task_vector_method(
        "dare_ties",
        "DARE's random drop and rescale, then TIES' sign election and merge of agreeing deltas.",
        Sparsification.random,
        "sum",
        DareTiesConfig,
        DensityInputParams,
    )
)
