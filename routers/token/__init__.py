"""Token-level routers: which adapters act on each token in each layer (torch engine); importing this package registers
every one of them in ``TOKEN_ROUTERS``. The mixture math they run in (stacked adapters, each router's per-token scores,
the mixture layer, sparse dispatch) lives with the engines in ``serving/mixture``; its names are re-exported here."""

from routers.token import arrow, glider, mixer, phatgoose
from routers.token.base import TOKEN_ROUTERS, FitContext, TokenRouter, TokenRouterConfig
from routers.token.glider import glider_bias
from serving.mixture import (
    AdapterRefused,
    LoraAdapter,
    MixtureLinear,
    Route,
    apply_mixture,
    load_lora_adapter,
    load_mixture_model,
)

__all__ = [
    "TOKEN_ROUTERS",
    "AdapterRefused",
    "FitContext",
    "LoraAdapter",
    "MixtureLinear",
    "Route",
    "TokenRouter",
    "TokenRouterConfig",
    "apply_mixture",
    "arrow",
    "glider",
    "glider_bias",
    "load_lora_adapter",
    "load_mixture_model",
    "mixer",
    "phatgoose",
]
