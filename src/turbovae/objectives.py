"""Training objectives. Each is ``fn(vae, x, *, generator, **options) -> dict`` of scalars, where
``loss`` is what is minimised and ``nelbo``, ``rec`` and ``kl`` are in nats per example.

The sign convention: rec = −E_q[log p(x|z)] ≥ 0 for discrete data, kl = KL(q(z|x) || p(z)) ≥ 0,
nelbo = rec + kl, the *negative* ELBO. The terms themselves come from the VAE's latent structure
(``structures/``: ``terms``, ``elbo``, ``log_weights``), the one place they are written; evaluation
calls the same methods.

A conditional VAE (``vae.n_classes`` > 0) takes the class ids ``y`` (B,) of the batch: the objectives
then bound log p(x | y), with q(z | x, y) and p(x | z, y) (Sohn, Lee & Yan 2015). Without ``y`` the
code paths are the unconditional ones, unchanged.
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
    y: torch.Tensor | None = None,
    **_: object,
) -> dict[str, torch.Tensor]:
    """The (β-)ELBO with one reparameterised sample: loss = mean(rec + β·kl). β = 1 is the ELBO.

    ``eps`` (B, L) is the noise of the sample; without it, noise is drawn from ``generator``. ``beta``
    may be a 0-dim tensor (KL warm-up changes it every step without recompiling the step). With
    ``free_bits`` = λ > 0 (Kingma et al. 2016) the loss charges each latent dimension's KL, averaged
    over the batch, as max(KL_d, λ): loss = mean(rec) + β·Σ_d max(mean_batch KL_d, λ). ``nelbo``, ``rec``
    and ``kl`` are always the true, unclipped terms.

    The terms come from the VAE's latent structure (``structures/``): a hierarchical network gets rec +
    the sum of its groups' analytic KLs KL(q(z_l | x, z_<l) || p(z_l | z_<l)), with ``kl_groups`` (G,)
    (batch means, top group first) among the terms; free bits apply to each group's batch-mean KL.
    """
    return vae.structure.elbo(vae, x, generator=generator, eps=eps, beta=beta, free_bits=free_bits, y=y)


def importance(
    vae: VAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL (B,) of the first sample's posterior, log p(x | z_i) (k, B), log-weights (k, B)) of k
    importance samples (noise ``eps`` (k, B, latent), else drawn from ``generator``)."""
    s = vae.structure
    if eps is None:
        eps = torch.randn(s.noise_shape(vae, len(x), k), generator=generator, device=x.device)
    log_px_z, log_ratio, kl = s.log_weights(vae, x, s.encoded(vae, x, y), eps, y, with_kl=True)
    assert kl is not None
    return kl, log_px_z, log_px_z + log_ratio


def log_weights(
    vae: VAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance log-weights log p(x, z_i) − log q(z_i | x) for k samples: shape (k, B), float32."""
    return importance(vae, x, k, generator, eps, y)[2]


def iwae(
    vae: VAE,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    k: int = 5,
    y: torch.Tensor | None = None,
    **_: object,
) -> dict[str, torch.Tensor]:
    """The importance-weighted bound (Burda et al. 2015) with k samples; k = 1 is the ELBO.

    ``eps`` has shape (k, B, L). ``nelbo``/``rec``/``kl`` are reported from the first sample so that
    curves stay comparable with the ELBO's.
    """
    kl, log_px_z, log_w = importance(vae, x, k, generator, eps, y)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)  # (B,)
    rec = -log_px_z[0]
    return {"loss": -bound.mean(), "nelbo": (rec + kl).mean(), "rec": rec.mean(), "kl": kl.mean()}


def noise_shape_of(name: str, batch: int, latent: int, k: int) -> tuple[int, ...]:
    """The shape of the reparameterisation noise objective ``name`` uses for one batch."""
    return (k, batch, latent) if name == "iwae" else (batch, latent)


OBJECTIVES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"elbo": elbo, "iwae": iwae}


def get_objective(name: str) -> Callable[..., dict[str, torch.Tensor]]:
    if name not in OBJECTIVES:
        raise unknown_name("objective", name, OBJECTIVES)
    return OBJECTIVES[name]
