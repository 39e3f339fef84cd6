"""The structure of latent diffusion's autoencoders (``models/autoencoder.py``): a flat view of spatial
latents, trained with a reconstruction likelihood (L1 as a Laplace, MSE as a Gaussian), a tiny KL
weight, MS-SSIM and a patch-GAN whose discriminator is trained in the same step.

Two players, one backward: the generator's GAN term runs the discriminator with its parameters
detached (``torch.func.functional_call``), the discriminator's loss runs it on the detached
reconstruction, so that one ``backward`` gives the autoencoder its gradient and the discriminator its
own (simultaneous updates; the alternating scheme of LDM and diffusers' script decodes twice a step).
The GAN terms are multiplied by a 0/1 factor, on after ``model.disc_start`` training passes (a counter
buffer of the network, so a checkpoint resumes it exactly), and weighted by LDM's adaptive weight,
the ratio of the gradient norms of the reconstruction and GAN terms at the decoder's last layer.

The loss is the weighted training loss; ``nelbo``, ``rec`` and ``kl`` stay the honest terms of the
bound (the likelihood's nats and the analytic KL), so the usual evaluation reads them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .gaussian import FlatGaussian

if TYPE_CHECKING:
    from ..vae import VAE


def _msssim_module() -> Any:
    try:
        import pytorch_msssim
    except ImportError:
        raise ConfigError(
            "MS-SSIM needs the pytorch-msssim package: pip install 'turbovae[diffusers]'"
        ) from None
    return pytorch_msssim


def window_for(side: int, levels: int = 5) -> int:
    """The largest odd Gaussian window (at most 11) that MS-SSIM's 4 halvings allow on ``side`` pixels."""
    w = min(11, (side - 1) // 2 ** (levels - 1) + 1)
    w = w if w % 2 else w - 1
    return max(w, 1)


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM (B,) of images in [0, 1] (B, C, H, W), float32; the window shrinks for small crops."""
    m = _msssim_module()
    return m.ms_ssim(a.float(), b.float(), data_range=1.0, size_average=False,
                     win_size=window_for(min(a.shape[-2:])))  # fmt: skip


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = _msssim_module()
    w = min(11, min(a.shape[-2:]))
    return m.ssim(a.float(), b.float(), data_range=1.0, size_average=False, win_size=w if w % 2 else w - 1)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


class Perceptual(FlatGaussian):
    name = "perceptual"
    description = "spatial latents of an autoencoder, L1/MSE + MS-SSIM + patch-GAN (autoencoder-kl)"

    def bottleneck(
        self, vae: VAE, x: torch.Tensor, eps: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z (B, latent), the charged regulariser (B,) before β, the honest KL in nats (B,))."""
        q = vae.net.encode(x)  # type: ignore[operator]
        z = q.rsample(eps=eps)
        kl = q.kl()
        return z, kl, kl

    def decode_latents(self, vae: VAE, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters for the bottleneck's latents."""
        return vae.net.decode(z)  # type: ignore[operator]

    def elbo(
        self,
        vae: VAE,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
        beta: float | torch.Tensor = 1.0,
        free_bits: float = 0.0,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        net: Any = vae.net
        cfg = net.cfg
        if eps is None:
            eps = torch.randn(len(x), vae.latent, generator=generator, device=x.device)
        z, charged, kl = self.bottleneck(vae, x, eps)
        params = self.decode_latents(vae, z)
        rec = -vae.likelihood.log_prob(x, params)  # (B,) nats
        x_rec = vae.likelihood.mean(params)  # (B, C, H, W)
        dims = math.prod(vae.event_shape)
        weighted = rec.mean()
        if cfg.ms_ssim > 0:  # per pixel, as LDM adds its perceptual term to every pixel's L1
            weighted = weighted + cfg.ms_ssim * dims * (1.0 - ms_ssim(x_rec, x)).mean()
        loss = weighted + beta * charged.mean()
        training = net.training and torch.is_grad_enabled()
        if net.discriminator is not None and training:
            loss = loss + self.gan_terms(vae, x, x_rec, weighted)
        if training:
            net.steps.add_(1)
        return {"loss": loss, "nelbo": (rec + kl).mean(), "rec": rec.mean(), "kl": kl.mean()}

    def gan_terms(
        self, vae: VAE, x: torch.Tensor, x_rec: torch.Tensor, rec_loss: torch.Tensor
    ) -> torch.Tensor:
        """The generator's adaptive-weighted GAN (and feature-matching) term plus the discriminator's
        loss, both times the start factor; gradients cross neither way (see the module docstring)."""
        net: Any = vae.net
        cfg = net.cfg
        disc = net.discriminator
        on = (net.steps >= cfg.disc_start).float()
        real, fake = x * 2.0 - 1.0, x_rec * 2.0 - 1.0  # the discriminator sees [-1, 1] like LDM's
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        logits = torch.func.functional_call(disc, frozen, (fake,))
        g_loss = -logits.float().mean()
        if cfg.adaptive_weight:
            last = net.last_layer()
            g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            weight = (g_rec.float().norm() / (g_gan.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()
        else:
            weight = torch.ones((), device=x.device)
        gen = cfg.disc_weight * weight * g_loss
        if cfg.feature_matching > 0:  # L1 between the discriminator's features of real and fake
            feats = {"features": True}
            with torch.no_grad():
                target = torch.func.functional_call(disc, frozen, (real,), feats)
            got = torch.func.functional_call(disc, frozen, (fake,), feats)
            fm = sum(F.l1_loss(a.float(), b.float()) for a, b in zip(got, target, strict=True))
            gen = gen + cfg.feature_matching * math.prod(vae.event_shape) * fm
        d_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        d_loss = d_fn(disc(real.detach()).float(), disc(fake.detach()).float())
        return on * (gen + d_loss)

    # ---- the optimiser, the summary -----------------------------------------------------------------

    def param_groups(self, vae: VAE) -> list[dict[str, Any]]:
        """The autoencoder's trained parameters; the discriminator's in a group of their own (its own
        betas and weight decay; the learning rate and schedule are the run's)."""
        net: Any = vae.net
        disc = net.discriminator
        own = set() if disc is None else {id(p) for p in disc.parameters()}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in vae.parameters() if p.requires_grad and id(p) not in own]}
        ]
        if disc is not None:
            betas = tuple(float(b) for b in net.cfg.disc_betas)
            groups.append(
                {"params": list(disc.parameters()), "betas": betas, "weight_decay": net.cfg.disc_weight_decay}
            )
        return groups

    @torch.no_grad()
    def final_metrics(self, vae: VAE, x: torch.Tensor, prepare: Any, batch: int = 64) -> dict[str, Any]:
        """Reconstruction metrics on the held-out images (PSNR, SSIM, MS-SSIM: means over images, the
        reconstructions clamped to [0, 1]) and the standard deviation of their latents (the scaling
        factor diffusers multiplies latents by is its inverse)."""
        psnr, s1, ms, zs = [], [], [], []
        for i in range(0, len(x), batch):
            xb = prepare(x[i : i + batch]).float()
            z = self.latent_mean(vae, xb)
            rec = vae.decode(z).clamp(0.0, 1.0)
            mse = (rec - xb).pow(2).flatten(1).mean(1)
            psnr.append(10.0 * torch.log10(1.0 / mse.clamp(min=1e-10)))
            s1.append(ssim(rec, xb))
            ms.append(ms_ssim(rec, xb))
            zs.append(z)
        z_all = torch.cat(zs)
        out = {
            "test_psnr": torch.cat(psnr).mean().item(),
            "test_ssim": torch.cat(s1).mean().item(),
            "test_ms_ssim": torch.cat(ms).mean().item(),
            "latent_std": z_all.float().std().item(),
        }
        out.update(self.codebook_metrics(vae, z_all))
        return out

    def latent_mean(self, vae: VAE, x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x).mean

    def codebook_metrics(self, vae: VAE, z: torch.Tensor) -> dict[str, Any]:
        return {}

    def codec_refusal(self, vae: VAE) -> str | None:
        return "an autoencoder's KL weight is tiny: its latents cost far more bits than a codec should spend"
