"""Token-level routers: which adapters act on each token in each layer (torch engine); importing this
package registers every one of them in ``TOKEN_ROUTERS``."""

from routers.token import arrow, glider, mixer, phatgoose
from routers.token.adapters import AdapterRefused, LoraAdapter, load_lora_adapter
from routers.token.base import TOKEN_ROUTERS, FitContext, Route, TokenRouter, TokenRouterConfig
from routers.token.glider import glider_bias
from routers.token.model import MixtureLinear, apply_mixture, load_mixture_model

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
