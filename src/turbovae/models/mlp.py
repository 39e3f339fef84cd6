"""A fully connected VAE network for vectors and (flattened) images."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..conditioning import one_hot
from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from .base import NOT_SHAPING, ModelConfig, check_widths

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass(slots=True)
class MLPConfig(ModelConfig):
    """``model.*`` of the MLP."""

    name: str = field(default="mlp", metadata=NOT_SHAPING)
    hidden: list[int] = field(default_factory=lambda: [400])  # the encoder's widths; the decoder mirrors them
    # with a Bernoulli likelihood: the decoder's output bias starts at the logit of the mean training
    # value of each pixel (as in Burda et al.'s IWAE code), so the first steps need not learn the mean image
    init_output_bias: bool = field(default=False, metadata=NOT_SHAPING)

    def check(self) -> None:
        check_widths("hidden", self.hidden)
        if self.init_output_bias and self.likelihood not in ("bernoulli", "bernoulli-grey"):
            raise ConfigError(
                "model.init_output_bias is for model mlp with likelihood bernoulli or bernoulli-grey, got "
                f"{self.name} with {self.likelihood}"
            )


def mlp(sizes: list[int], activation: str, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPNet(nn.Module):
    """Encoder D → hidden… → 2·latent and mirrored decoder latent → …hidden → P·D.

    With ``n_classes`` K > 0 the network is conditional (a CVAE): the one-hot class y (K) is
    concatenated to the encoder's input and to the decoder's z, and the decoder's output has a bias per
    class (``class_bias``, K x P·D), which ``init_from_data`` starts, with a Bernoulli likelihood, at the
    logit of each class's mean training image: from the first step the class alone draws its mean image,
    and z need not carry the class (at the defaults on 8,000 Fashion-MNIST images, 500 steps, a logistic
    regression recognises the asked class in 92% of samples instead of 34%). K = 0 builds exactly the
    unconditional network. With ``output_bias_from_data`` (``model.init_output_bias``), ``init_from_data``
    starts the decoder's output bias at the logit of the mean training image."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent: int,
        params_per_dim: int,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
        n_classes: int = 0,
        output_bias_from_data: bool = False,
        class_bias_from_data: bool = False,
    ) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.params_per_dim = params_per_dim
        self.n_classes = n_classes
        self.output_bias_from_data = output_bias_from_data
        self.class_bias_from_data = class_bias_from_data and n_classes > 0
        dims = math.prod(self.event_shape)
        self.encoder = mlp([dims + n_classes, *hidden, 2 * latent], activation, dropout)
        self.decoder = mlp(
            [latent + n_classes, *reversed(hidden), params_per_dim * dims], activation, dropout
        )
        if n_classes:  # after the layers: their seeded initial weights are those of before
            self.class_bias = nn.Parameter(torch.zeros(n_classes, params_per_dim * dims))

    def init_from_data(
        self, mean: Callable[[], torch.Tensor], class_mean: Callable[[], torch.Tensor] | None = None
    ) -> None:
        """The hook ``engine/setup.py`` calls on any network that has it, once, before training:
        ``mean()`` is the mean training value of each pixel, ``class_mean()`` (K, *event) that of each
        class of a conditional run (functions: computed only where used)."""
        if self.output_bias_from_data:
            self.init_output_bias(mean())
        if self.class_bias_from_data and class_mean is not None:
            self.init_class_bias(class_mean())

    @torch.no_grad()
    def init_class_bias(self, means: torch.Tensor) -> None:
        """Start each class's output bias at the logit of its mean image (K, *event; values in [0, 1]),
        less the shared output bias where that already starts at the logit of the mean image."""
        logits = torch.logit(means.double().flatten(1), eps=1e-3)
        if self.output_bias_from_data:
            last = self.decoder[-1]
            assert isinstance(last, nn.Linear)
            logits = logits - last.bias.double()
        self.class_bias.copy_(logits.float())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a conditional run saved before the class bias existed: a zero bias, the network it was
        if self.n_classes and prefix + "class_bias" not in state_dict:
            state_dict[prefix + "class_bias"] = torch.zeros_like(self.class_bias)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def init_output_bias(self, mean: torch.Tensor) -> None:
        """Start the decoder's output at the logit of ``mean`` (event-shaped, the mean training value of
        each pixel, in [0, 1]): a Bernoulli likelihood's one parameter per value."""
        last = self.decoder[-1]
        assert isinstance(last, nn.Linear)
        last.bias.copy_(torch.logit(mean.double().flatten(), eps=1e-3).float())

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        h = x.flatten(1)  # (B, D)
        if self.n_classes:  # (B, D + K)
            h = torch.cat([h, one_hot(y, self.n_classes, h)], -1)
        loc, log_scale = self.encoder(h).chunk(2, dim=-1)  # (B, L) each
        return DiagonalGaussian(loc, log_scale)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        code = None
        if self.n_classes:  # y (B,) broadcast over z's leading sample dims: (..., B, L + K)
            code = one_hot(y, self.n_classes, z)
            z = torch.cat([z, code.expand(*z.shape[:-1], self.n_classes)], -1)
        out = self.decoder(z)  # (..., P·D); leading dims pass through
        if code is not None:  # the class's output bias (B, P·D), broadcast the same way
            out = out + code @ self.class_bias.to(code.dtype)
        return out.unflatten(-1, (self.params_per_dim, *self.event_shape))


def build(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg: MLPConfig, n_classes: int = 0
) -> nn.Module:
    return MLPNet(event_shape, latent, params_per_dim, list(cfg.hidden), cfg.activation, cfg.dropout,
                  n_classes=n_classes, output_bias_from_data=cfg.init_output_bias,
                  class_bias_from_data=cfg.likelihood in ("bernoulli", "bernoulli-grey"))  # fmt: skip
