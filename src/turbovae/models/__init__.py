"""Model networks, registered by name. A network maps x → q(z|x) (``encode``) and z → likelihood
parameters (``decode``); it never computes a loss."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import unknown_name
from .conv import ConvNet
from .mlp import ACTIVATIONS, MLPNet


def _mlp(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg) -> nn.Module:
    return MLPNet(event_shape, latent, params_per_dim, list(cfg.hidden), cfg.activation, cfg.dropout)


def _conv(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg) -> nn.Module:
    return ConvNet(event_shape, latent, params_per_dim, list(cfg.channels), cfg.activation, cfg.dropout)


# name -> builder(event_shape, latent, params_per_dim, model_config)
MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "conv": _conv}


def build_network(
    name: str, event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg
) -> nn.Module:
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    return MODELS[name](event_shape, latent, params_per_dim, cfg)


__all__ = ["ACTIVATIONS", "MODELS", "ConvNet", "MLPNet", "build_network"]
