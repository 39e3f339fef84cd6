"""The flat Gaussian structure: q(z | x) = N(μ(x), diag σ(x)²), p(z) = N(0, I) (mlp, conv)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..distributions import DiagonalGaussian
from .base import LatentStructure, Noise, Pick, Terms, autocast_or_not, net_call

if TYPE_CHECKING:
    from ..vae import VAE


class FlatGaussian(LatentStructure):
    name = "gaussian"
    description = "one latent vector, diagonal Gaussian posterior, N(0, I) prior (mlp, conv)"

    def sample_params(
        self, vae: VAE, n: int, generator: torch.Generator | None, temperature: float, y: torch.Tensor | None
    ) -> torch.Tensor:
        device = next(vae.parameters()).device
        z = temperature * vae.prior(device).rsample((n,), generator=generator)
        return net_call(vae.net.decode, z, y=y)

    def terms(
        self,
        vae: VAE,
        x: torch.Tensor,
        eps: Noise = None,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
    ) -> Terms:
        q: DiagonalGaussian = net_call(vae.net.encode, x, y=y)
        z = q.rsample(generator=generator, eps=eps)  # (B, L)
        rec = -vae.likelihood.log_prob(x, self.decode_params(vae, z, x, y))  # (B,)
        return Terms(rec, q.kl(), q=q)  # the KL analytic, against N(0, I)

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
        t = self.terms(vae, x, eps, generator, y)
        assert t.q is not None
        if free_bits > 0:
            kl_charged = t.q.kl_per_dim().mean(0).clamp(min=free_bits).sum()  # below λ nats a dim is free
            loss = t.rec.mean() + beta * kl_charged
        else:
            loss = (t.rec + beta * t.kl).mean()
        return {"loss": loss, "nelbo": (t.rec + t.kl).mean(), "rec": t.rec.mean(), "kl": t.kl.mean()}

    def encoded(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        return net_call(vae.net.encode, x, y=y)

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
        q: DiagonalGaussian = state
        z = q.loc + eps * q.stddev  # (c, B, L)
        with autocast_or_not(x.device, precision):
            params = self.decode_params(vae, z, x, y)  # (c, B, P, *event)
        like = vae.likelihood
        log_px_z = like.log_prob(x, params) if grad else like.log_prob_eval(x, params)  # (c, B) float32
        # log p(z) − log q(z|x) = −½|z|² + ½|eps|² + Σ log σ   (the 2π terms cancel; exact in eps)
        log_ratio = 0.5 * (eps.pow(2) - z.pow(2)).sum(-1) + q.log_scale.sum(-1)
        return log_px_z, log_ratio, q.kl() if with_kl else None

    def walk(self, vae: VAE, x: torch.Tensor | None, n: int, pick: Pick, decode: bool = True) -> Any:
        q = None if x is None else vae.encode(x)
        z = pick(0, None, q)
        return vae.decode_params(z) if decode else None
