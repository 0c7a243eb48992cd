"""The default byte-level GPT, user model factories and the loss hook."""

from steadytrain.model.factory import LossFn, build_model, next_token_loss, resolve_loss_fn
from steadytrain.model.gpt import GPT, KVCache, Prefill, build_gpt

__all__ = [
    "GPT",
    "KVCache",
    "LossFn",
    "Prefill",
    "build_gpt",
    "build_model",
    "next_token_loss",
    "resolve_loss_fn",
]
