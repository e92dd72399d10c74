"""Token-level mixtures as the engine runs them: PEFT LoRA folders read into stacked tensors (``adapters``), the
per-token scoring of each router (``scores``), the sparse-dispatch math (``sparse``), the mixture layer wrapping a
model's linear layers (``layer``) and what that layer calls on a token router (``route``). The routers (configs,
fitting, stored states) are in ``routers/token``, which imports this package; nothing here imports them."""

from serving.mixture.adapters import AdapterRefused, LoraAdapter, load_lora_adapter
from serving.mixture.layer import MixtureLinear, apply_mixture, load_mixture_model
from serving.mixture.route import MixtureRouter, Route, softmax_of_sorted

__all__ = [
    "AdapterRefused",
    "LoraAdapter",
    "MixtureLinear",
    "MixtureRouter",
    "Route",
    "apply_mixture",
    "load_lora_adapter",
    "load_mixture_model",
    "softmax_of_sorted",
]
