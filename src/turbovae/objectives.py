"""Training objectives. Each is ``fn(vae, x, *, generator, **options) -> dict`` of scalars, where
``loss`` is what is minimised and ``nelbo``, ``rec`` and ``kl`` are in nats per example.

The sign convention: rec = −E_q[log p(x|z)] ≥ 0 for discrete data, kl = KL(q(z|x) || p(z)) ≥ 0,
nelbo = rec + kl, the *negative* ELBO. This is the one place the loss is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import unknown_name
from .vae import VAE

Noise = torch.Tensor | None  # standard-normal reparameterisation noise, drawn by the caller if given


def elbo(
    vae: VAE,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    beta: float | torch.Tensor = 1.0,
    free_bits: float = 0.0,
    **_: object,
) -> dict[str, torch.Tensor]:
    """The (β-)ELBO with one reparameterised sample: loss = mean(rec + β·kl). β = 1 is the ELBO.

    ``eps`` (B, L) is the noise of the sample; without it, noise is drawn from ``generator``. ``beta``
    may be a 0-dim tensor (KL warm-up changes it every step without recompiling the step). With
    ``free_bits`` = λ > 0 (Kingma et al. 2016) the loss charges each latent dimension's KL, averaged
    over the batch, as max(KL_d, λ): loss = mean(rec) + β·Σ_d max(mean_batch KL_d, λ). ``nelbo``, ``rec``
    and ``kl`` are always the true, unclipped terms.
    """
    q = vae.encode(x)
    z = q.rsample(generator=generator, eps=eps)  # (B, L)
    rec = -vae.likelihood.log_prob(x, vae.decode_params(z, x))  # (B,)
    kl = q.kl()  # (B,) analytic KL against N(0, I)
    if free_bits > 0:
        kl_charged = q.kl_per_dim().mean(0).clamp(min=free_bits).sum()  # below λ nats a dimension is free
        loss = rec.mean() + beta * kl_charged
    else:
        loss = (rec + beta * kl).mean()
    return {
        "loss": loss,
        "nelbo": (rec + kl).mean(),
        "rec": rec.mean(),
        "kl": kl.mean(),
    }


def _importance(vae: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None, eps: Noise = None):
    q = vae.encode(x)
    z = q.rsample((k,), generator=generator, eps=eps)  # (k, B, L)
    log_px_z = vae.likelihood.log_prob(x, vae.decode_params(z, x))  # (k, B)
    log_w = log_px_z + vae.prior(x.device).log_prob(z) - q.log_prob(z)
    return q, log_px_z, log_w


def log_weights(
    vae: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None, eps: Noise = None
) -> torch.Tensor:
    """Importance log-weights log p(x, z_i) − log q(z_i | x) for k samples: shape (k, B), float32."""
    return _importance(vae, x, k, generator, eps)[2]


def iwae(
    vae: VAE,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    k: int = 5,
    **_: object,
) -> dict[str, torch.Tensor]:
    """The importance-weighted bound (Burda et al. 2015) with k samples; k = 1 is the ELBO.

    ``eps`` has shape (k, B, L). ``nelbo``/``rec``/``kl`` are reported from the first sample so that
    curves stay comparable with the ELBO's.
    """
    q, log_px_z, log_w = _importance(vae, x, k, generator, eps)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)  # (B,)
    rec, kl = -log_px_z[0], q.kl()
    return {"loss": -bound.mean(), "nelbo": (rec + kl).mean(), "rec": rec.mean(), "kl": kl.mean()}


def noise_shape_of(name: str, batch: int, latent: int, k: int) -> tuple[int, ...]:
    """The shape of the reparameterisation noise objective ``name`` uses for one batch."""
    return (k, batch, latent) if name == "iwae" else (batch, latent)


OBJECTIVES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"elbo": elbo, "iwae": iwae}


def get_objective(name: str) -> Callable[..., dict[str, torch.Tensor]]:
    if name not in OBJECTIVES:
        raise unknown_name("objective", name, OBJECTIVES)
    return OBJECTIVES[name]
