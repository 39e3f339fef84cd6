"""Decoder likelihoods p(x | z): log_prob summed per example in nats, computed in float32.

The decoder outputs ``params`` of shape ``(..., P, *event_shape)``: P values per data dimension
(``params_per_dim``), leading dims are the batch and, for IWAE, the importance samples. ``x`` has
shape ``(..., *event_shape)`` and broadcasts against the leading dims of ``params``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, unknown_name

_LOG_2PI = math.log(2.0 * math.pi)
MIN_SCALE = 1e-3  # floor on a Gaussian's scale: per-pixel variances collapse to 0 on constant pixels


class Likelihood(nn.Module):
    """Base class. Subclasses set ``params_per_dim``, ``support`` and ``discrete``."""

    name = "base"
    params_per_dim = 1
    support = "real"  # "binary": {0, 1}; "unit": [0, 1]; "real": any finite value
    discrete = False  # a probability mass on the data, so bits/dim are defined

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)

    def _sum_event(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(-len(self.event_shape)).sum(-1)

    def _param(self, params: torch.Tensor, i: int) -> torch.Tensor:
        return params.select(-len(self.event_shape) - 1, i).float()

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over the event dims: shape ``params.shape[:-len(event)-1]``."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | params], shape ``(..., *event_shape)``."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample x ~ p(x | params)."""
        raise NotImplementedError

    def check_data(self, low: float, high: float, binary: bool, name: str) -> None:
        """Raise DataError when data with this range cannot be scored by this likelihood."""
        label = type(self).name
        if self.support == "binary" and not binary:
            raise DataError(
                f"likelihood '{label}' needs binary data, but '{name}' has values in [{low:g}, {high:g}] "
                "that are not all 0 or 1: use --binarize dynamic|static, --likelihood continuous-bernoulli "
                "or gaussian, or --likelihood bernoulli-grey for BCE on grey values (not a normalised "
                "likelihood; the pytorch/examples convention)"
            )
        if self.support in ("binary", "unit") and (low < 0.0 or high > 1.0):
            raise DataError(
                f"likelihood '{label}' needs data in [0, 1], but '{name}' has values in "
                f"[{low:g}, {high:g}]: rescale the data or use --likelihood gaussian"
            )


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class Bernoulli(Likelihood):
    """Bernoulli on logits, for binary data: log p = x·η − softplus(η)."""

    name = "bernoulli"
    support = "binary"
    discrete = True

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        logits = self._param(params, 0)
        x = x.float().expand_as(logits)
        return -self._sum_event(F.binary_cross_entropy_with_logits(logits, x, reduction="none"))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._param(params, 0))

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.mean(params)
        return (_uniform(p, generator) < p).float()


class BernoulliGrey(Bernoulli):
    """Binary cross-entropy on grey values in [0, 1], the pytorch/examples convention.

    Not a normalised density for non-binary x: its "NELBO" is not a bound on anything, so it is kept
    only for comparisons with code that uses it, and must be asked for by name.
    """

    name = "bernoulli-grey"
    support = "unit"
    discrete = False


def _cb_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(η) of the continuous Bernoulli with logits η, where C(η) = η / tanh(η / 2)."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    taylor = math.log(2.0) + logits.pow(2) / 12.0  # log(2 (1 + η²/12 + O(η⁴)))
    return torch.where(small, taylor, exact)


class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1] for grey values."""

    name = "continuous-bernoulli"
    support = "unit"

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        logits = self._param(params, 0)
        x = x.float().expand_as(logits)
        log_p = -F.binary_cross_entropy_with_logits(logits, x, reduction="none") + _cb_log_norm(logits)
        return self._sum_event(log_p)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        logits = self._param(params, 0)
        small = logits.abs() < 1e-2
        safe = torch.where(small, torch.ones_like(logits), logits)
        # E[x] = σ(η) / tanh(η/2) − 1/η, with limit ½ + η/12 at η = 0
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1.0 / safe
        return torch.where(small, 0.5 + logits / 12.0, exact)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = self._param(params, 0)
        u = _uniform(logits, generator)
        small = logits.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(logits), logits)
        # inverse CDF: x = log(1 + u (e^η − 1)) / η, written to avoid overflow for large |η|
        positive = 1.0 + torch.log(u + (1.0 - u) * torch.exp(-safe.clamp(min=0))) / safe
        negative = torch.log1p(u * torch.expm1(safe.clamp(max=0))) / safe
        x = torch.where(safe > 0, positive, negative)
        return torch.where(small, u, x).clamp(0.0, 1.0)


class Gaussian(Likelihood):
    """Gaussian with a fixed scale σ (``likelihood_scale``); the decoder outputs the mean."""

    name = "gaussian"

    def __init__(self, event_shape: tuple[int, ...], scale: float = 0.1) -> None:
        super().__init__(event_shape)
        self.log_scale: torch.Tensor
        self.register_buffer("log_scale", torch.tensor(math.log(scale)))

    def _loc_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self._param(params, 0)
        return loc, self.log_scale.float().expand_as(loc)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._loc_log_scale(params)
        standardized = (x.float() - loc) * torch.exp(-log_scale)
        return self._sum_event(-0.5 * standardized.pow(2) - log_scale - 0.5 * _LOG_2PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._param(params, 0)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        loc, log_scale = self._loc_log_scale(params)
        eps = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + eps * log_scale.exp()


class GaussianLearned(Gaussian):
    """Gaussian with one learned scale shared by all dimensions, initialised at ``likelihood_scale``."""

    name = "gaussian-learned"

    def __init__(self, event_shape: tuple[int, ...], scale: float = 0.1) -> None:
        Likelihood.__init__(self, event_shape)
        # softplus keeps σ ≥ MIN_SCALE with smooth gradients (no clamp that stops learning)
        init = math.log(math.expm1(max(scale - MIN_SCALE, 1e-6)))
        self.raw_scale = nn.Parameter(torch.tensor(init))

    def _loc_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self._param(params, 0)
        return loc, torch.log(F.softplus(self.raw_scale.float()) + MIN_SCALE).expand_as(loc)


class GaussianPixel(Gaussian):
    """Gaussian whose mean and scale the decoder outputs for every dimension (per-pixel variance)."""

    name = "gaussian-pixel"
    params_per_dim = 2

    def __init__(self, event_shape: tuple[int, ...], scale: float = 0.1) -> None:
        Likelihood.__init__(self, event_shape)
        # offset so that a zero decoder output starts at σ = scale
        self.raw_offset = math.log(math.expm1(max(scale - MIN_SCALE, 1e-6)))

    def _loc_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = F.softplus(self._param(params, 1) + self.raw_offset) + MIN_SCALE
        return self._param(params, 0), torch.log(scale)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (Bernoulli, BernoulliGrey, ContinuousBernoulli, Gaussian, GaussianLearned, GaussianPixel)
}


def build_likelihood(
    name: str, event_shape: tuple[int, ...], scale: float = 0.1, data_meta: dict[str, Any] | None = None
) -> Likelihood:
    """The likelihood registered as ``name``; ``scale`` is the (initial) σ of the Gaussian ones.

    ``data_meta`` is the dataset's description (``Dataset.meta``), for likelihoods that need to know
    the data's layout."""
    if name not in LIKELIHOODS:
        raise unknown_name("likelihood", name, LIKELIHOODS)
    cls = LIKELIHOODS[name]
    if issubclass(cls, Gaussian):
        return cls(event_shape, scale)
    return cls(event_shape)
