"""The vector-quantised structure (``--model autoencoder-vq``): the encoder's output snapped to the
nearest of K codes at every latent position, a straight-through gradient, a commitment term, the
codebook kept as an EMA of the outputs assigned to it (``models/autoencoder.py``' VectorQuantizer).

Its bound: a one-hot posterior against a uniform prior over the K codes costs log K nats per position
(the VQ-VAE paper's KL), so ``kl`` is that constant and ``nelbo`` = −log p(x | codes) + positions · log K.
The loss is the reconstruction's, the commitment's and the GAN's as for the KL autoencoder. Codebook
usage (the share of codes the held-out images use) and perplexity go to summary.json."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .base import Noise, Terms
from .perceptual import Perceptual

if TYPE_CHECKING:
    from ..vae import VAE


class Quantised(Perceptual):
    name = "quantised"
    description = "vector-quantised spatial latents: nearest codes, EMA codebook, restarts (autoencoder-vq)"

    def _positions(self, vae: VAE) -> int:
        net: Any = vae.net
        return int(net.z_shape[1] * net.z_shape[2])

    def _kl(self, vae: VAE, batch: int, device: torch.device) -> torch.Tensor:
        net: Any = vae.net
        nats = self._positions(vae) * math.log(net.cfg.codebook_size)
        return torch.full((batch,), nats, device=device)

    def bottleneck(
        self, vae: VAE, x: torch.Tensor, eps: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net: Any = vae.net
        zq, commitment, _ = net.quantise(net.encode(x).mean)
        return zq, commitment, self._kl(vae, len(x), x.device)

    def decode_latents(self, vae: VAE, z: torch.Tensor) -> torch.Tensor:
        return vae.net.decode_codes(z)  # type: ignore[operator]

    def terms(
        self,
        vae: VAE,
        x: torch.Tensor,
        eps: Noise = None,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
    ) -> Terms:
        net: Any = vae.net
        zq = net.quantise(net.encode(x).mean)[0]
        rec = -vae.likelihood.log_prob(x, net.decode_codes(zq))
        return Terms(rec, self._kl(vae, len(x), x.device))

    def log_weights(self, vae: VAE, x: torch.Tensor, state: Any, eps: torch.Tensor, y: Any = None,
                    **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        raise ConfigError("a VQ autoencoder's posterior is a point mass: no IWAE estimate (eval.iwae_k=0)")

    def codebook_metrics(self, vae: VAE, z: torch.Tensor) -> dict[str, Any]:
        """The share of the K codes the latents ``z`` (N, latent_size) use, and the perplexity of their
        frequencies (exp of the entropy: K when all are used alike)."""
        net: Any = vae.net
        codes = net.quantise(z)[2].flatten()
        k = net.cfg.codebook_size
        freq = torch.bincount(codes, minlength=k).double() / len(codes)
        entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
        return {
            "codebook_usage": float((freq > 0).double().mean()),
            "codebook_perplexity": float(entropy.exp()),
        }

    def codec_refusal(self, vae: VAE) -> str | None:
        return "a VQ autoencoder has no continuous posterior for bits-back coding"
