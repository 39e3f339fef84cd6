"""Posterior diagnostics: the posterior of every example, active units (Burda et al.'s criterion), the KL
per latent dimension, and the mutual information I(x; z) with the marginal KL(q(z) || p(z))."""

from __future__ import annotations

import math

import torch

from ..distributions import DiagonalGaussian
from ..vae import VAE
from .likelihood import CHUNK_VALUES, LOG_2PI, EvalMode, Prepare, batches

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015: unit u is active when Cov_x(E_q[z_u]) > 0.01


@torch.no_grad()
def encode_all(
    vae: VAE, x: torch.Tensor, prepare: Prepare, *, batch_size: int = 1000, y: torch.Tensor | None = None
) -> DiagonalGaussian:
    """q(z | x) for every example: a DiagonalGaussian with loc and log_scale of shape (N, L), float32.
    A conditional model takes the class ids ``y`` (N,): q(z | x, y)."""
    locs, log_scales = [], []
    with EvalMode(vae):
        for start, raw in enumerate(batches(x, batch_size)):
            yb = None if y is None else y[start * batch_size : (start + 1) * batch_size]
            q = vae.encode(prepare(raw), yb)
            locs.append(q.loc)
            log_scales.append(q.log_scale)
    return DiagonalGaussian(torch.cat(locs), torch.cat(log_scales))


def active_units(q: DiagonalGaussian, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, list[float]]:
    """Burda et al.'s criterion: unit u is active when A_u = Cov_x(E_q[z_u | x]) > ``threshold``.

    Returns the number of active units and A_u for every dimension (the variance over examples of the
    posterior mean)."""
    loc = q.loc.double()
    variance = loc.var(0) if len(loc) > 1 else torch.zeros(loc.shape[-1], dtype=torch.float64)
    return int((variance > threshold).sum().item()), variance.cpu().tolist()


def kl_per_dim(q: DiagonalGaussian) -> list[float]:
    """KL(q(z_u | x) || N(0, 1)) for each latent dimension u, averaged over the examples (nats)."""
    return q.kl_per_dim().double().mean(0).cpu().tolist()


MI_DRAWS = 8  # independent draws of z per example: their spread gives the standard errors


@torch.no_grad()
def mutual_information(
    q: DiagonalGaussian,
    *,
    generator: torch.Generator | None = None,
    max_values: int = CHUNK_VALUES,
    draws: int = MI_DRAWS,
) -> dict[str, float]:
    """I(x; z) under the encoder's joint q(x, z) = p_data(x) q(z|x), by Hoffman & Johnson's ELBO surgery.

    E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z)), with the aggregate posterior
    q(z) = (1/N) Σ_n q(z | x_n) over the N examples given. One z_m ~ q(z | x_m) per example and
    log q(z_m) = logmeanexp_n log q(z_m | x_n) over all N (chunked, float64) give one estimate of

        mutual_info = mean_m [log q(z_m | x_m) − log q(z_m)]        (≤ log N by construction)
        marginal_kl = mean_m [log q(z_m) − log p(z_m)]

    Each is averaged over ``draws`` independent draws, and ``*_stderr`` is the standard error of that
    average (the spread over the draws / √draws). ``kl_mc`` = mutual_info + marginal_kl is then the
    Monte-Carlo average KL, which matches the analytic E_x KL(q(z|x) || p(z)) within a few ``kl_mc_stderr``.
    All in nats.
    """
    if draws < 2:
        raise ValueError(f"draws must be >= 2 for a standard error, got {draws}")
    loc, log_scale = q.loc.double(), q.log_scale.double()
    n, latent = loc.shape
    const = -0.5 * latent * LOG_2PI
    # log q(z_m | x_n) = −½ Σ_l (z_ml − μ_nl)² / σ_nl² − Σ_l log σ_nl + const, as matmuls:
    #   −½ [z² · (1/σ²)ᵀ − 2 z · (μ/σ²)ᵀ + Σ μ²/σ²]
    precision = torch.exp(-2.0 * log_scale)  # (N, L)
    a, b = precision.T, (loc * precision).T  # (L, N)
    c = -0.5 * (loc.pow(2) * precision).sum(-1) - log_scale.sum(-1) + const  # (N,)
    rows = max(1, max_values // max(1, n))
    estimates = torch.empty(draws, 2, dtype=torch.float64)  # (mutual_info, marginal_kl) per draw
    for d in range(draws):
        eps = torch.randn(loc.shape, generator=generator, device=q.loc.device).double()
        z = loc + eps * log_scale.exp()  # (N, L)
        log_q_own = -0.5 * eps.pow(2).sum(-1) - log_scale.sum(-1) + const  # log q(z_m | x_m)
        log_prior = -0.5 * z.pow(2).sum(-1) + const
        log_marginal = torch.empty(n, dtype=torch.float64, device=loc.device)
        for i in range(0, n, rows):
            zc = z[i : i + rows]  # (m, L)
            log_q = -0.5 * (zc.pow(2) @ a) + zc @ b + c  # (m, N)
            log_marginal[i : i + rows] = torch.logsumexp(log_q, 1) - math.log(n)
        estimates[d, 0] = (log_q_own - log_marginal).mean().cpu()
        estimates[d, 1] = (log_marginal - log_prior).mean().cpu()
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(draws)
    total = estimates.sum(1)
    return {
        "mutual_info": mean[0].item(),
        "mutual_info_stderr": stderr[0].item(),
        "marginal_kl": mean[1].item(),
        "marginal_kl_stderr": stderr[1].item(),
        "kl_mc": total.mean().item(),
        "kl_mc_stderr": (total.std() / math.sqrt(draws)).item(),
        "mi_draws": draws,
    }
