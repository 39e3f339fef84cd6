"""The VAE: a network (encoder + decoder), a likelihood p(x|z) and the prior N(0, I)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .distributions import DiagonalGaussian
from .likelihoods import Likelihood


class VAE(nn.Module):
    """What ``turbovae.load`` returns. Inputs are float tensors ``(B, *event_shape)`` preprocessed as in
    training (bytes divided by the dataset's ``max_value``, binarised if the run binarised)."""

    def __init__(self, net: nn.Module, likelihood: Likelihood, latent: int) -> None:
        super().__init__()
        self.net = net
        self.likelihood = likelihood
        self.latent = latent
        self.config: Any = None  # the run's Config, set by turbovae.load
        self.max_value = 1.0  # inputs are stored values / max_value (e.g. bytes / 255)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.likelihood.event_shape

    def prior(self, device: torch.device | str | None = None) -> DiagonalGaussian:
        return DiagonalGaussian.standard((self.latent,), device=device)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x); ``.mean`` gives the usual embedding."""
        return self.net.encode(x)  # type: ignore[operator]

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """Raw likelihood parameters ``(..., P, *event_shape)`` for latents ``(..., latent)``."""
        return self.net.decode(z)  # type: ignore[operator]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], the picture a latent stands for: ``(..., *event_shape)``."""
        return self.likelihood.mean(self.decode_params(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = mean of q(z | x)]."""
        return self.decode(self.encode(x).mean)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True) -> torch.Tensor:
        """n draws from the model: z ~ N(0, I), then E[x | z] (``mean=True``) or x ~ p(x | z)."""
        device = next(self.parameters()).device
        z = self.prior(device).rsample((n,), generator=generator)
        params = self.decode_params(z)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
