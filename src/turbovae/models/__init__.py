"""Model networks, registered by name. A network maps x → q(z|x) (``encode``) and z → likelihood
parameters (``decode``); it never computes a loss."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError, unknown_name
from .conv import ConvNet
from .hvae import HVAENet
from .mlp import ACTIVATIONS, MLPNet
from .text import SentenceNet


def _mlp(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg) -> nn.Module:
    return MLPNet(event_shape, latent, params_per_dim, list(cfg.hidden), cfg.activation, cfg.dropout)


def _conv(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg) -> nn.Module:
    return ConvNet(event_shape, latent, params_per_dim, list(cfg.channels), cfg.activation, cfg.dropout)


def _sentence(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg) -> nn.Module:
    # text: event_shape = (T,), params_per_dim = the vocabulary size (the categorical likelihood's P);
    # model.hidden = the RNN's width, one entry per layer
    if len(event_shape) != 1 or params_per_dim < 4:
        raise ConfigError("model 'sentence' is for text: --data text:PATH or words, --likelihood categorical")
    if len(set(cfg.hidden)) != 1:
        raise ConfigError(f"model 'sentence' needs equal RNN widths in model.hidden, got {cfg.hidden}")
    return SentenceNet(params_per_dim, event_shape[0], latent, cfg.hidden[0], len(cfg.hidden), cfg.embedding,
                       cfg.cell, cfg.word_dropout, cfg.dropout)  # fmt: skip


def _per_level(cfg, key: str, default: list[int]) -> list[int]:
    """A per-resolution list option of the hvae (empty or absent: ``default``)."""
    values = getattr(cfg, key, None)
    return [int(v) for v in values] if values else default


def _hvae(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg) -> nn.Module:
    # model.channels: widths per resolution level; model.latent: latent channels per group wherever
    # model.latent_channels does not say; model.hidden is unused. The hvae options are read with
    # defaults, so that configs without them (older runs) build the same network.
    levels = len(cfg.channels)
    return HVAENet(
        event_shape,
        params_per_dim,
        list(cfg.channels),
        groups=_per_level(cfg, "groups", [1] * levels),
        latent_channels=_per_level(cfg, "latent_channels", [latent] * levels),
        enc_blocks=_per_level(cfg, "enc_blocks", [1] * levels),
        activation=cfg.activation,
        bottleneck=float(getattr(cfg, "bottleneck", 0.25)),
        softplus_scales=bool(getattr(cfg, "softplus_scales", True)),
        residual_posterior=bool(getattr(cfg, "residual_posterior", True)),
        kl_balance=bool(getattr(cfg, "kl_balance", True)),
        patch=int(getattr(cfg, "patch", 1)),
    )


# name -> builder(event_shape, latent, params_per_dim, model_config)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "conv": _conv,
    "sentence": _sentence,
    "hvae": _hvae,
}
TEXT_MODELS = ("sentence",)  # models of token sequences (likelihood categorical)


def build_network(
    name: str, event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg
) -> nn.Module:
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    return MODELS[name](event_shape, latent, params_per_dim, cfg)


__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "TEXT_MODELS",
    "ConvNet",
    "HVAENet",
    "MLPNet",
    "SentenceNet",
    "build_network",
]
