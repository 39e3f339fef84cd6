"""The diagonal Gaussian used for posteriors and priors.

Everything that is summed over dimensions (log_prob, kl) is computed in float32 even under
autocast: these sums are where reduced precision loses nats.
"""

from __future__ import annotations

import math

import torch

_LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian:
    """N(loc, diag(scale²)) over the last dimension; batch dimensions in front.

    Parameterised by ``loc`` and ``log_scale`` (log standard deviation) so that the scale is positive
    without clamping and the KL is computed from logs directly.
    """

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor) -> None:
        if loc.shape != log_scale.shape:
            raise ValueError(f"loc {tuple(loc.shape)} and log_scale {tuple(log_scale.shape)} differ")
        self.loc = loc.float()
        self.log_scale = log_scale.float()

    @classmethod
    def standard(cls, shape: tuple[int, ...], device: torch.device | str | None = None) -> DiagonalGaussian:
        """The standard normal N(0, I) with the given shape."""
        zeros = torch.zeros(shape, device=device)
        return cls(zeros, zeros)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def stddev(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def variance(self) -> torch.Tensor:
        return (2.0 * self.log_scale).exp()

    def rsample(
        self,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A reparameterised sample of shape ``sample_shape + loc.shape``; gradients flow to loc/scale.

        ``eps`` is standard-normal noise of that shape drawn by the caller (a compiled step draws it
        outside the graph); otherwise it is drawn here from ``generator``.
        """
        if eps is None:
            shape = tuple(sample_shape) + tuple(self.loc.shape)
            eps = torch.randn(shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + eps * self.stddev

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; loc, scale²) summed over the last dimension. z may carry extra leading dims."""
        z = z.float()
        standardized = (z - self.loc) * torch.exp(-self.log_scale)
        return (-0.5 * standardized.pow(2) - self.log_scale - 0.5 * _LOG_2PI).sum(-1)

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) summed over the last dimension (non-negative); other=None is N(0, I)."""
        return self.kl_per_dim(other).sum(-1)

    def kl_per_dim(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) for each latent dimension, shape of ``loc``."""
        if other is None:
            # KL(N(m, s²) || N(0, 1)) = ½ (m² + s² − 1) − log s
            return 0.5 * (self.loc.pow(2) + self.variance - 1.0) - self.log_scale
        # KL(N(m1, s1²) || N(m2, s2²)) = log(s2/s1) + (s1² + (m1 − m2)²) / (2 s2²) − ½
        var_ratio = torch.exp(2.0 * (self.log_scale - other.log_scale))
        mean_term = ((self.loc - other.loc) * torch.exp(-other.log_scale)).pow(2)
        return 0.5 * (var_ratio + mean_term - 1.0) - (self.log_scale - other.log_scale)
