"""Training objectives. Each is ``fn(vae, x, *, generator, **options) -> dict`` of scalars, where
``loss`` is what is minimised and ``nelbo``, ``rec`` and ``kl`` are in nats per example.

The sign convention: rec = −E_q[log p(x|z)] ≥ 0 for discrete data, kl = KL(q(z|x) || p(z)) ≥ 0,
nelbo = rec + kl, the *negative* ELBO. This is the one place the loss is computed.

A conditional VAE (``vae.n_classes`` > 0) takes the class ids ``y`` (B,) of the batch: the objectives
then bound log p(x | y), with q(z | x, y) and p(x | z, y) (Sohn, Lee & Yan 2015). Without ``y`` the
code paths are the unconditional ones, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .distributions import DiagonalGaussian
from .errors import unknown_name
from .vae import VAE

_LOG_2PI = math.log(2.0 * math.pi)
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

    A hierarchical network (``vae.hierarchical``) gets rec + the sum of its groups' analytic KLs
    KL(q(z_l | x, z_<l) || p(z_l | z_<l)), with ``kl_groups`` (G,) (batch means, top group first)
    among the terms; free bits apply to each group's batch-mean KL, see ``hierarchical_elbo``.
    """
    if vae.hierarchical:
        return hierarchical_elbo(vae, x, generator=generator, eps=eps, beta=beta, free_bits=free_bits, y=y)
    q = vae.encode(x, y)
    z = q.rsample(generator=generator, eps=eps)  # (B, L)
    rec = -vae.likelihood.log_prob(x, vae.decode_params(z, x, y))  # (B,)
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


# ---- hierarchical (top-down) networks ------------------------------------------------------------------


def hierarchical_terms(
    vae: VAE,
    x: torch.Tensor,
    eps: Noise = None,
    generator: torch.Generator | None = None,
    k: int | None = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x | z) (..., B), KL per group (..., B, G), Σ_l log p(z_l | z_<l) − log q(z_l | x, z_<l)
    (..., B)) of one posterior pass of a hierarchical network, for noise ``eps`` (..., B, latent)
    (drawn from ``generator`` with k samples in front when None). The encoder runs once; with sample
    dims the top-down pass runs on every sample."""
    if eps is None:
        shape = (*(() if k is None else (k,)), len(x), vae.latent)
        eps = torch.randn(shape, generator=generator, device=x.device)
    net = vae.net
    if y is None:
        params, groups = net.posterior(net.features(x), eps)  # type: ignore[operator]
    else:  # conditional: every prior and posterior of the top-down pass sees the class
        params, groups = net.posterior(net.features(x), eps, y)  # type: ignore[operator]
    log_px_z = vae.likelihood.log_prob(x, params)
    kl_groups = torch.stack([q.kl(p) for q, p, _ in groups], -1)  # analytic; p = None is N(0, I)
    return log_px_z, kl_groups, log_prior_ratio(groups)


def log_prior_ratio(
    groups: list[tuple[DiagonalGaussian, DiagonalGaussian | None, torch.Tensor]],
) -> torch.Tensor:
    """Σ_l log p(z_l | z_<l) − log q(z_l | x, z_<l) over the (q, p, z) of a hierarchical posterior pass
    (p = None: N(0, I)), float32: the latent part of an importance log-weight."""
    total = torch.zeros((), device=groups[0][2].device)
    for q, p, z in groups:
        log_prior = p.log_prob(z) if p is not None else -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * _LOG_2PI)
        total = total + log_prior - q.log_prob(z)
    return total


def kl_balance_weights(kl_groups: torch.Tensor, group_dims: torch.Tensor) -> torch.Tensor:
    """NVAE's KL balancing coefficients (Vahdat & Kautz 2020): group l weighs (KL_l + 0.01) / α_l, α_l
    ∝ its number of latent dims (``group_dims``), normalised to mean 1, without gradient. Groups that
    carry more KL per dimension are charged more, so that during KL warm-up the code spreads over the
    groups instead of settling in a few while the others collapse."""
    coeff = (kl_groups.detach() + 0.01) / group_dims
    return coeff / coeff.mean()


def hierarchical_elbo(
    vae: VAE,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    beta: float | torch.Tensor = 1.0,
    free_bits: float = 0.0,
    y: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The ELBO of a hierarchical network: rec + Σ_l KL_l, each KL analytic given the sampled z_<l.

    Free bits (λ = ``free_bits``) charge each group's batch-mean KL as max(KL_l, λ). With the network's
    ``kl_balance`` on, while β < 1 (KL warm-up) the groups' KLs are weighed by ``kl_balance_weights``
    (mean 1); at β = 1 the loss is the plain (free-bits) ELBO. ``kl`` is the total, ``kl_groups``
    the per-group batch means (they sum to ``kl``)."""
    log_px_z, kl_groups, _ = hierarchical_terms(vae, x, eps, generator, y=y)
    rec = -log_px_z  # (B,)
    kl = kl_groups.sum(-1)  # (B,)
    per_group = kl_groups.mean(0)  # (G,)
    charged = per_group.clamp(min=free_bits) if free_bits > 0 else per_group
    if getattr(vae.net, "kl_balance", False):
        weights = kl_balance_weights(per_group, vae.net.group_dims)  # type: ignore[arg-type]
        if isinstance(beta, torch.Tensor):  # β of a KL schedule: decided on the device, no host sync
            charged = charged * torch.where(beta < 1.0, weights, torch.ones_like(weights))
        elif beta < 1.0:
            charged = charged * weights
    loss = rec.mean() + beta * charged.sum()
    return {
        "loss": loss,
        "nelbo": (rec + kl).mean(),
        "rec": rec.mean(),
        "kl": kl.mean(),
        "kl_groups": per_group.detach(),
    }


def _importance(
    vae: VAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
    eps: Noise = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL (B,) of the first sample's posterior, log p(x | z_i) (k, B), log-weights (k, B))."""
    if vae.hierarchical:  # log w = log p(x|z) + Σ_l [log p(z_l | z_<l) − log q(z_l | x, z_<l)]
        log_px_z, kl_groups, log_ratio = hierarchical_terms(vae, x, eps, generator, k, y=y)
        return kl_groups[0].sum(-1), log_px_z, log_px_z + log_ratio
    q = vae.encode(x, y)
    z = q.rsample((k,), generator=generator, eps=eps)  # (k, B, L)
    log_px_z = vae.likelihood.log_prob(x, vae.decode_params(z, x, y))  # (k, B)
    log_w = log_px_z + vae.prior(x.device).log_prob(z) - q.log_prob(z)
    return q.kl(), log_px_z, log_w


def log_weights(
    vae: VAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    eps: Noise = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance log-weights log p(x, z_i) − log q(z_i | x) for k samples: shape (k, B), float32."""
    return _importance(vae, x, k, generator, eps, y)[2]


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
    kl, log_px_z, log_w = _importance(vae, x, k, generator, eps, y)
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
