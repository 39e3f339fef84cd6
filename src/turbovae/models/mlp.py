"""A fully connected VAE network for vectors and (flattened) images."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ..distributions import DiagonalGaussian

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


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
    """Encoder D → hidden… → 2·latent and mirrored decoder latent → …hidden → P·D."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent: int,
        params_per_dim: int,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.params_per_dim = params_per_dim
        dims = math.prod(self.event_shape)
        self.encoder = mlp([dims, *hidden, 2 * latent], activation, dropout)
        self.decoder = mlp([latent, *reversed(hidden), params_per_dim * dims], activation, dropout)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x.flatten(1))  # (B, 2L)
        loc, log_scale = h.chunk(2, dim=-1)
        return DiagonalGaussian(loc, log_scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)  # (..., P·D); leading dims pass through
        return out.unflatten(-1, (self.params_per_dim, *self.event_shape))
