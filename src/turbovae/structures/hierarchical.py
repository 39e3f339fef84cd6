"""The hierarchical structure: groups z_1 … z_G, top-down, q(z_l | x, z_<l) and p(z_l | z_<l) (hvae).

The network (``models/hvae.py``) provides ``features(x)`` (the bottom-up pass), ``top_down(n, feats,
pick)`` (one top-down pass, ``pick`` choosing each group's values), ``posterior(feats, eps)`` (the
reparameterised pass for noise of any leading shape), ``sample_params``, ``reconstruct_params``,
``group_sizes``, ``top_size``, ``group_dims`` and ``kl_balance``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..distributions import DiagonalGaussian
from .base import Decoder, Encoder, LatentStructure, Noise, Pick, Terms, autocast_or_not, net_call

if TYPE_CHECKING:
    from ..vae import VAE

_LOG_2PI = math.log(2.0 * math.pi)
Records = list[tuple[DiagonalGaussian, DiagonalGaussian | None, torch.Tensor]]


def log_prior_ratio(groups: Records) -> torch.Tensor:
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


def posterior_pass(
    vae: VAE,
    x: torch.Tensor,
    eps: Noise,
    generator: torch.Generator | None,
    k: int | None,
    y: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x | z) (..., B), KL per group (..., B, G), Σ_l log p(z_l | z_<l) − log q(z_l | x, z_<l)
    (..., B)) of one posterior pass, for noise ``eps`` (..., B, latent) (drawn from ``generator`` with
    k samples in front when None). The encoder runs once; with sample dims the top-down pass runs on
    every sample."""
    if eps is None:
        shape = (*(() if k is None else (k,)), len(x), vae.latent)
        eps = torch.randn(shape, generator=generator, device=x.device)
    net: Any = vae.net
    params, groups = net_call(net.posterior, net.features(x), eps, y=y)
    log_px_z = vae.likelihood.log_prob(x, params)
    kl_groups = torch.stack([q.kl(p) for q, p, _ in groups], -1)  # analytic; p = None is N(0, I)
    return log_px_z, kl_groups, log_prior_ratio(groups)


class HierarchicalEncoder(Encoder):
    """x → every group's posterior mean and log-variance, top-down, flat (B, latent_size): group l's
    q(z_l | x, z_<l) with the upper groups at their posterior means, as ``vae.reconstruct`` runs."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net: Any = self.vae.net
        # x.shape[0], not len(x): len() would fix the batch size in the exported graph
        _, records = net.top_down(x.shape[0], net.features(x), lambda i, p, q: q.loc)
        return torch.cat([q.loc for q, _, _ in records], -1), 2.0 * torch.cat(
            [q.log_scale for q, _, _ in records], -1
        )


class HierarchicalDecoder(Decoder):
    """z (B, latent_size), all groups' latents flat in top-down order → parameters and E[x | z]: what
    ``vae.decode_params`` computes for a full latent vector."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net: Any = self.vae.net
        values = z.float().split(net.group_sizes, dim=-1)
        params, _ = net.top_down(z.shape[0], None, lambda i, p, q: values[i])
        return params, self.vae.likelihood.mean(params)


class Hierarchical(LatentStructure):
    name = "hierarchical"
    description = "top-down groups of latents, p(z_l | z_<l) and q(z_l | x, z_<l) (hvae)"
    posterior_group = "the top group"

    def prior_size(self, vae: VAE) -> int:
        return int(vae.net.top_size)  # type: ignore[arg-type]

    def groups(self, vae: VAE) -> list[int]:
        return list(vae.net.group_sizes)  # type: ignore[arg-type]

    def reconstruct(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Every group at its posterior mean, top-down."""
        return vae.likelihood.mean(net_call(vae.net.reconstruct_params, x, y=y))

    def sample_params(
        self, vae: VAE, n: int, generator: torch.Generator | None, temperature: float, y: torch.Tensor | None
    ) -> torch.Tensor:
        """z drawn top-down from the conditional priors, every group's σ_p times ``temperature``."""
        return net_call(vae.net.sample_params, n, generator, temperature, y=y)

    def terms(
        self,
        vae: VAE,
        x: torch.Tensor,
        eps: Noise = None,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
    ) -> Terms:
        # the network's training pass: each group's sample and KL fused, no log-ratio (IWAE's alone)
        if eps is None:
            eps = torch.randn((len(x), vae.latent), generator=generator, device=x.device)
        net: Any = vae.net
        params, kl_groups = net_call(net.kl_pass, net.features(x), eps, y=y)
        return Terms(-vae.likelihood.log_prob(x, params), kl_groups.sum(-1), kl_groups=kl_groups)

    def elbo(
        self,
        vae: VAE,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        eps: Noise = None,
        beta: float | torch.Tensor = 1.0,
        free_bits: float = 0.0,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """rec + Σ_l KL_l, each KL analytic given the sampled z_<l. Free bits (λ) charge each group's
        batch-mean KL as max(KL_l, λ). With the network's ``kl_balance`` on, while β < 1 (KL warm-up) the
        groups' KLs are weighed by ``kl_balance_weights`` (mean 1); at β = 1 the loss is the plain
        (free-bits) ELBO. ``kl_groups``: the per-group batch means (they sum to ``kl``)."""
        t = self.terms(vae, x, eps, generator, y)
        assert t.kl_groups is not None
        per_group = t.kl_groups.mean(0)  # (G,)
        charged = per_group.clamp(min=free_bits) if free_bits > 0 else per_group
        if getattr(vae.net, "kl_balance", False):
            weights = kl_balance_weights(per_group, vae.net.group_dims)  # type: ignore[arg-type]
            if isinstance(beta, torch.Tensor):  # β of a KL schedule: decided on the device, no host sync
                charged = charged * torch.where(beta < 1.0, weights, torch.ones_like(weights))
            elif beta < 1.0:
                charged = charged * weights
        loss = t.rec.mean() + beta * charged.sum()
        return {
            "loss": loss,
            "nelbo": (t.rec + t.kl).mean(),
            "rec": t.rec.mean(),
            "kl": t.kl.mean(),
            "kl_groups": per_group.detach(),
        }

    def encoded(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        """The bottom-up activations: the posteriors depend on the sampled z_<l, so they are computed
        per sample in the top-down pass."""
        return vae.net.features(x)  # type: ignore[operator]

    def log_weights(
        self,
        vae: VAE,
        x: torch.Tensor,
        state: Any,
        eps: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        precision: str | None = None,
        grad: bool = True,
        with_kl: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """log w = log p(x|z) + Σ_l log p(z_l | z_<l) − log q(z_l | x, z_<l), the top-down pass per sample."""
        with autocast_or_not(x.device, precision):
            params, groups = net_call(vae.net.posterior, state, eps, y=y)
        like = vae.likelihood
        log_px_z = like.log_prob(x, params) if grad else like.log_prob_eval(x, params)
        kl = torch.stack([q.kl(p) for q, p, _ in groups], -1)[0].sum(-1) if with_kl else None
        return log_px_z, log_prior_ratio(groups), kl

    def eval_extras(self, vae: VAE, nelbo: dict[str, Any]) -> dict[str, Any]:
        # active units, KL per dim and I(x; z) are the top group's (the latents whose prior is N(0, I))
        return {
            "kl_groups": nelbo["kl_groups"],
            "latent_groups": self.groups(vae),
            "posterior_stats": "top group",
            "top_latent": self.prior_size(vae),
        }

    def export_encoder(self, vae: VAE) -> nn.Module:
        return HierarchicalEncoder(vae)

    def export_decoder(self, vae: VAE) -> nn.Module:
        return HierarchicalDecoder(vae)

    def walk(self, vae: VAE, x: torch.Tensor | None, n: int, pick: Pick, decode: bool = True) -> Any:
        """Plain BB-ANS over the hierarchy: every group in turn, top-down."""
        net: Any = vae.net
        feats = None if x is None else net.features(x)
        return net.top_down(n, feats, lambda i, p, q: pick(i, None if i == 0 else p, q))[0]
