"""Model networks, registered by name. A network maps x → q(z|x) (``encode``) and z → likelihood
parameters (``decode``); it never computes a loss.

A new model is one file in this folder and one ``MODELS`` entry: its builder and its ``ModelSpec``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown_name
from .conv import ConvNet
from .hvae import HVAENet
from .mlp import ACTIVATIONS, MLPNet
from .text import SentenceNet


def _mlp(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg, n_classes: int = 0
) -> nn.Module:
    return MLPNet(event_shape, latent, params_per_dim, list(cfg.hidden), cfg.activation, cfg.dropout,
                  n_classes=n_classes, output_bias_from_data=cfg.init_output_bias)  # fmt: skip


def _conv(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg, n_classes: int = 0
) -> nn.Module:
    return ConvNet(event_shape, latent, params_per_dim, list(cfg.channels), cfg.activation, cfg.dropout,
                   n_classes=n_classes)  # fmt: skip


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


def _hvae(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg, n_classes: int = 0
) -> nn.Module:
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
        n_classes=n_classes,
    )


def _widths(key: str, label: str) -> Callable[[dict[str, Any]], str]:
    def describe(model: dict[str, Any]) -> str:
        sep = "-" if key == "hidden" else ","
        return f"{label} {sep.join(str(v) for v in model.get(key, []))}, latent {model.get('latent', '?')}"

    return describe


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, and what the rest of turbovae needs to know about it."""

    build: Callable[..., nn.Module]  # (event_shape, latent, params_per_dim, model_config) -> network
    fields: tuple[str, ...]  # the model.* keys that shape the network (the compile-cost cache key)
    width: str | None = None  # the model.* list that tune's search scales
    depth: bool = False  # whether tune's search may change that list's length
    channels_last: bool = False  # lay the weights out NHWC on CUDA (cuDNN's preferred layout)
    text: bool = False  # a model of token sequences (likelihood categorical)
    # whether the builder takes n_classes (a conditional VAE: data.condition, see conditioning.py)
    conditional: bool = False
    describe: Callable[[dict[str, Any]], str] | None = None  # one line for the report, from model.*

    def text_of(self, name: str, model: dict[str, Any]) -> str:
        if self.describe is not None:
            return self.describe(model)
        return f"{name}, latent {model.get('latent', '?')}"


_COMMON = ("latent", "activation", "dropout", "likelihood", "mixtures")
_HVAE = ("channels", "latent_channels", "groups", "enc_blocks", "patch", "bottleneck", "softplus_scales",
         "residual_posterior", "kl_balance")  # fmt: skip
MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        _mlp,
        ("hidden", *_COMMON),
        width="hidden",
        depth=True,
        conditional=True,
        describe=_widths("hidden", "MLP"),
    ),
    "conv": ModelSpec(
        _conv,
        ("channels", *_COMMON),
        width="channels",
        channels_last=True,
        conditional=True,
        describe=_widths("channels", "conv"),
    ),
    "sentence": ModelSpec(
        _sentence,
        ("hidden", "embedding", "cell", "word_dropout", *_COMMON),
        width="hidden",
        depth=True,
        text=True,
    ),
    "hvae": ModelSpec(_hvae, (*_HVAE, *_COMMON), width="channels", conditional=True),
}
TEXT_MODELS = tuple(name for name, spec in MODELS.items() if spec.text)  # models of token sequences


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    return MODELS[name]


def build_network(
    name: str, event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg, n_classes: int = 0
) -> nn.Module:
    """The network ``name``; with ``n_classes`` K > 0 a conditional one (models whose spec is
    ``conditional``)."""
    spec = model_spec(name)
    if not n_classes:
        return spec.build(event_shape, latent, params_per_dim, cfg)
    if not spec.conditional:
        conditional = ", ".join(n for n, s in MODELS.items() if s.conditional)
        raise ConfigError(f"model '{name}' cannot be conditional (data.condition); use one of: {conditional}")
    return spec.build(event_shape, latent, params_per_dim, cfg, n_classes=n_classes)


__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "TEXT_MODELS",
    "ConvNet",
    "HVAENet",
    "MLPNet",
    "ModelSpec",
    "SentenceNet",
    "build_network",
    "model_spec",
]
