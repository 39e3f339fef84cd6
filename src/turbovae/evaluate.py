"""Held-out evaluation: NELBO (split into reconstruction and KL), the IWAE log-likelihood estimate
with its standard error, and bits/dim where the likelihood is a probability mass."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .objectives import log_weights
from .vae import VAE

Prepare = Callable[[torch.Tensor], torch.Tensor]


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


@torch.no_grad()
def nelbo(
    vae: VAE,
    x: torch.Tensor,
    prepare: Prepare,
    *,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Single-sample NELBO per example over all of ``x`` (an unbiased estimate), with rec and KL."""
    was_training = vae.training
    vae.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for raw in _batches(x, batch_size):
        xb = prepare(raw)
        q = vae.encode(xb)
        z = q.rsample(generator=generator)
        rec = -vae.likelihood.log_prob(xb, vae.decode_params(z))
        kl = q.kl()
        totals += torch.stack([(rec + kl).sum(), rec.sum(), kl.sum()]).double().cpu()
    vae.train(was_training)
    n = len(x)
    return {"nelbo": totals[0].item() / n, "rec": totals[1].item() / n, "kl": totals[2].item() / n}


@torch.no_grad()
def iwae_nll(
    vae: VAE,
    x: torch.Tensor,
    prepare: Prepare,
    *,
    k: int,
    batch_size: int = 1000,
    sample_chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """−log p(x) estimated with k importance samples per example (Burda et al. 2015).

    Memory is bounded by chunking over examples (``batch_size``) and samples (``sample_chunk``, chosen
    so that one chunk decodes about 2^20 data values by default). log-mean-exp runs in float64.
    Returns the mean over examples and its standard error.
    """
    was_training = vae.training
    vae.eval()
    dims = math.prod(vae.event_shape) * vae.likelihood.params_per_dim
    per_example: list[torch.Tensor] = []
    for raw in _batches(x, batch_size):
        xb = prepare(raw)
        chunk = sample_chunk or max(1, min(k, (1 << 20) // max(1, dims * len(xb))))
        parts = [log_weights(vae, xb, min(chunk, k - s), generator).double() for s in range(0, k, chunk)]
        log_w = torch.cat(parts, dim=0)  # (k, B)
        per_example.append(-(torch.logsumexp(log_w, dim=0) - math.log(k)).cpu())
    vae.train(was_training)
    nll = torch.cat(per_example)
    stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    return {"nll": nll.mean().item(), "stderr": stderr, "k": k, "n": len(nll)}


def bits_per_dim(nats: float, dims: int) -> float:
    """nats per example → bits per data dimension."""
    return nats / (dims * math.log(2.0))
