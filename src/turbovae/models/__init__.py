"""Model networks, registered by name. A network maps x → q(z|x) (``encode``) and z → likelihood
parameters (``decode``); it never computes a loss.

A new model is one file in this folder (its network, its config dataclass of options, its builder) and
one ``MODELS`` entry, its ``ModelSpec``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown_name
from . import autoencoder, conv, hvae, mlp, text
from .autoencoder import AutoencoderConfig, VQAutoencoderConfig
from .base import ModelConfig
from .conv import ConvConfig, ConvNet
from .hvae import HVAEConfig, HVAENet
from .mlp import ACTIVATIONS, MLPConfig, MLPNet
from .text import SentenceConfig, SentenceNet


def _widths(key: str, label: str) -> Callable[[dict[str, Any]], str]:
    def describe(model: dict[str, Any]) -> str:
        sep = "-" if key == "hidden" else ","
        return f"{label} {sep.join(str(v) for v in model.get(key, []))}, latent {model.get('latent', '?')}"

    return describe


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, its options, and what the rest of turbovae needs to know."""

    build: Callable[..., nn.Module]  # (event_shape, latent, params_per_dim, model_config) -> network
    config: type[ModelConfig]  # the family's options: cfg.model is one of these
    summary: str  # one line for --model's help and docs/training.md
    width: str | None = None  # the model.* list that tune's search scales
    depth: bool = False  # whether tune's search may change that list's length
    channels_last: bool = False  # lay the weights out NHWC on CUDA (cuDNN's preferred layout)
    text: bool = False  # a model of token sequences (likelihood categorical)
    # whether the builder takes n_classes (a conditional VAE: data.condition, see conditioning.py)
    conditional: bool = False
    describe: Callable[[dict[str, Any]], str] | None = None  # one line for the report, from model.*

    @property
    def fields(self) -> tuple[str, ...]:
        """The model.* keys that shape the network (the compile-cost cache key)."""
        return self.config.shape_fields()

    def text_of(self, name: str, model: dict[str, Any]) -> str:
        if self.describe is not None:
            return self.describe(model)
        return f"{name}, latent {model.get('latent', '?')}"


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        mlp.build,
        MLPConfig,
        "fully connected, encoder D → hidden… → 2·latent and its mirror",
        width="hidden",
        depth=True,
        conditional=True,
        describe=_widths("hidden", "MLP"),
    ),
    "conv": ModelSpec(
        conv.build,
        ConvConfig,
        "ResNet-style convolutional net for images, a residual block and a stride-2 conv per level",
        width="channels",
        channels_last=True,
        conditional=True,
        describe=_widths("channels", "conv"),
    ),
    "sentence": ModelSpec(
        text.build,
        SentenceConfig,
        "the sentence VAE for text, a GRU or LSTM encoder and language-model decoder",
        width="hidden",
        depth=True,
        text=True,
    ),
    "hvae": ModelSpec(
        hvae.build,
        HVAEConfig,
        "a top-down hierarchical VAE (VDVAE / NVAE family), groups of latents per resolution level",
        width="channels",
        conditional=True,
    ),
    "autoencoder-kl": ModelSpec(
        autoencoder.build,
        AutoencoderConfig,
        "latent diffusion's KL autoencoder (SD-VAE family): spatial latents, L1 + MS-SSIM + patch-GAN",
        width="channels",
        channels_last=True,
        describe=autoencoder.describe,
    ),
    "autoencoder-vq": ModelSpec(
        autoencoder.build_vq,
        VQAutoencoderConfig,
        "latent diffusion's VQ autoencoder (VQModel): nearest codes, EMA codebook, dead-code restarts",
        width="channels",
        channels_last=True,
        describe=autoencoder.describe,
    ),
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
    "AutoencoderConfig",
    "ConvConfig",
    "ConvNet",
    "HVAEConfig",
    "HVAENet",
    "MLPConfig",
    "MLPNet",
    "ModelConfig",
    "ModelSpec",
    "SentenceConfig",
    "SentenceNet",
    "VQAutoencoderConfig",
    "build_network",
    "model_spec",
]
