"""Build the model and the loss from ``pkg.module:function`` references in the config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from steadytrain.config import DEFAULT_MODEL_FACTORY, Config, FactoryError, resolve_callable

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def build_model(config: Config) -> nn.Module:
    """Call ``model.factory(**model.kwargs)`` and check it returned an ``nn.Module``.

    The built-in GPT gets ``max_seq_len = data.seq_len`` unless the kwargs say otherwise.

    Raises:
        FactoryError: when the factory cannot be imported, rejects the kwargs, or returns
            something that is not a module.
    """
    factory = resolve_callable(config.model.factory, field="model.factory")
    kwargs = dict(config.model.kwargs)
    if config.model.factory == DEFAULT_MODEL_FACTORY:
        kwargs.setdefault("max_seq_len", config.data.seq_len)
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as error:
        raise FactoryError(
            f"model.factory: {config.model.factory} rejected model.kwargs {kwargs} ({error}); "
            "fix model.kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"model.factory: {config.model.factory} returned {type(model).__name__}, not a "
            "torch.nn.Module; return the model"
        )
    return model


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token ``t+1`` from tokens ``..t``.

    ``batch`` is (micro_batch, seq_len + 1) token ids.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def resolve_loss_fn(config: Config) -> LossFn:
    """The configured ``train.loss_fn`` hook, or next-token cross-entropy."""
    if config.train.loss_fn is None:
        return next_token_loss
    return resolve_callable(config.train.loss_fn, field="train.loss_fn")
