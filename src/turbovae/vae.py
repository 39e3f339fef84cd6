"""The VAE: a network (encoder + decoder), a likelihood p(x|z) and the prior N(0, I)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .distributions import DiagonalGaussian
from .errors import ConfigError
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
        # the dataset's description (Dataset.meta: a table's columns and fitted transforms), set by
        # build_vae and so by turbovae.load
        self.data_meta: dict[str, Any] = {}

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.likelihood.event_shape

    def prior(self, device: torch.device | str | None = None) -> DiagonalGaussian:
        """p(z) = N(0, I); for a hierarchical network, the top group's prior (the lower groups' priors are
        conditional: ``sample`` draws from them)."""
        size = self.net.top_size if self.hierarchical else self.latent
        return DiagonalGaussian.standard((size,), device=device)  # type: ignore[arg-type]

    @property
    def hierarchical(self) -> bool:
        """Whether the network is a top-down hierarchy of latent groups (``models/hvae.py``): its latent
        vector is all groups' values, its prior is conditional, not N(0, I) over the flat vector."""
        return bool(getattr(self.net, "hierarchical", False))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x); ``.mean`` gives the usual embedding. For a hierarchical network, the
        top group's posterior q(z_1 | x), the one group whose prior is N(0, I)."""
        return self.net.encode(x)  # type: ignore[operator]

    @property
    def autoregressive(self) -> bool:
        """Whether the decoder reads the data it scores (text: teacher forcing), see ``decode_params``."""
        return bool(getattr(self.net, "autoregressive", False))

    def decode_params(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Raw likelihood parameters ``(..., P, *event_shape)`` for latents ``(..., latent)``.

        An autoregressive network (text) also needs the data ``x`` (B, *event) whose likelihood the
        parameters are for (each position is predicted from the ones before it); z may carry sample
        dims in front of B. Other networks ignore ``x``."""
        if self.autoregressive:
            if x is None:
                raise ValueError("an autoregressive decoder needs x in decode_params; decode/sample generate")
            return self.net.decode(z, x)  # type: ignore[operator]
        return self.net.decode(z)  # type: ignore[operator]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], the picture a latent stands for: ``(..., *event_shape)``. For text, the greedy
        decoding of z: token ids (..., T)."""
        if self.autoregressive:
            ids = self.net.generate(z.reshape(-1, self.latent), self.event_shape[0])  # type: ignore[operator]
            return ids.view(*z.shape[:-1], -1)
        return self.likelihood.mean(self.decode_params(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = mean of q(z | x)]; hierarchical: every group at its posterior mean, top-down."""
        if self.hierarchical:
            return self.likelihood.mean(self.net.reconstruct_params(x))  # type: ignore[operator]
        return self.decode(self.encode(x).mean)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, mean: bool = True, temperature: float = 1.0
    ) -> torch.Tensor:
        """n draws from the model: z ~ N(0, I), then E[x | z] (``mean=True``) or x ~ p(x | z).

        For text: token ids (n, T), decoded greedily (``mean=True``) or drawn token by token.
        Hierarchical: z drawn top-down from the conditional priors p(z_l | z_<l).
        ``temperature`` T scales the prior's standard deviations (z ~ N(0, T²I); hierarchical: every
        group's σ_p): below 1 the draws come from nearer the prior's mode, the usual trade of diversity
        for cleaner samples in deep VAEs (NVAE, VDVAE); 0 gives the mode itself."""
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ConfigError(f"the sampling temperature must be finite and >= 0, got {temperature}")
        device = next(self.parameters()).device
        if self.hierarchical:
            params = self.net.sample_params(n, generator, temperature)  # type: ignore[operator]
            return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
        z = temperature * self.prior(device).rsample((n,), generator=generator)
        if self.autoregressive:
            return self.net.generate(z, self.event_shape[0], generator, greedy=mean)  # type: ignore[operator]
        params = self.decode_params(z)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
