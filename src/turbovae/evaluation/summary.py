"""``evaluate``: every held-out number of a model on a split, the JSON that ``turbovae eval`` prints."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .. import runtime
from ..vae import VAE
from .diagnostics import ACTIVE_THRESHOLD, active_units, encode_all, kl_per_dim, mutual_information
from .floor import matmul_floor
from .likelihood import Prepare, Progress, bits_per_dim, default_prepare, iwae_log_likelihood, nelbo


@torch.no_grad()
def evaluate(
    vae: VAE,
    x: torch.Tensor,
    prepare: Prepare | None = None,
    *,
    k: int,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
    floor: bool = False,
    y: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every held-out number of a model on ``x``: what ``turbovae eval --json`` prints.

    Keys: ``nelbo``, ``rec``, ``kl`` (single-sample estimate, nats), ``nll_iwae`` ± ``nll_iwae_stderr``
    with ``k`` samples, ``ess`` (mean effective sample size of the k weights), ``bpd`` (the NELBO's
    bits/dim, as ``test_bpd`` in summary.json) and ``bpd_iwae`` (the IWAE estimate's, as ``test_bpd_iwae``;
    both None unless the likelihood is a probability mass), ``n``, ``latent``, ``active_units`` (with
    ``active_threshold`` and ``posterior_mean_variance`` per dimension), ``kl_per_dim``, ``mutual_info``
    and ``marginal_kl`` with their standard errors, ``kl_mc`` (their sum) and ``mi_draws`` (see
    :func:`mutual_information`; for a hierarchical model, of its top group:
    ``posterior_stats`` = "top group", ``top_latent`` dims; plus ``kl_groups``, the KL of every
    group, and ``latent_groups``, their sizes), ``precision`` (of the IWAE decoder; with
    ``bf16_delta`` under ``auto``), and timings ``seconds`` (all of it) and ``iwae_seconds``. With
    ``floor=True``, also ``floor_seconds`` (the matmul-bound floor at the precision used, see
    ``matmul_floor``) and ``floor_ratio`` = iwae_seconds / floor_seconds; under bf16 also the fp32
    floor ``floor_seconds_fp32`` and ``floor_ratio_fp32``.

    A conditional model takes the class ids ``y`` (N,) of ``x``: every figure is then conditional,
    −log p(x | y) and q(z | x, y), and ``conditional`` is True.
    floor ``floor_seconds_fp32`` and ``floor_ratio_fp32``. ``prepare`` defaults to ``default_prepare``;
    ``progress`` is called with the examples of every finished IWAE batch.
    """
    prepare = prepare or default_prepare(vae, x)
    t0 = time.perf_counter()
    ev = nelbo(vae, x, prepare, batch_size=1000, generator=generator, y=y)
    q = encode_all(vae, x, prepare, y=y)
    active, variance = active_units(q)
    mi = mutual_information(q, generator=generator)
    device = x.device
    runtime.synchronize(device)
    t_iwae = time.perf_counter()
    r = iwae_log_likelihood(
        vae, x, prepare, k=k, batch_size=batch_size, generator=generator, precision=precision, y=y,
        progress=progress,
    )  # fmt: skip
    runtime.synchronize(device)
    iwae_seconds = time.perf_counter() - t_iwae
    nll = -r["log_px"]
    dims = math.prod(vae.event_shape)
    discrete = vae.likelihood.discrete
    result: dict[str, Any] = {
        "nelbo": ev["nelbo"],
        "rec": ev["rec"],
        "kl": ev["kl"],
        "nll_iwae": nll.mean().item(),
        "nll_iwae_stderr": nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan"),
        "k": k,
        "ess": r["ess"].mean().item(),
        "bpd": bits_per_dim(ev["nelbo"], dims) if discrete else None,
        "bpd_iwae": bits_per_dim(nll.mean().item(), dims) if discrete else None,
        "n": len(x),
        "latent": vae.latent,
        "active_units": active,
        "active_threshold": ACTIVE_THRESHOLD,
        "posterior_mean_variance": variance,
        "kl_per_dim": kl_per_dim(q),
        **mi,
        "precision": r["precision"],
        "iwae_batch_size": r["batch_size"],
        "iwae_sample_chunk": r["sample_chunk"],
    }
    if y is not None:
        result["conditional"] = True
    for key in ("bf16_delta", "bf16_delta_bound"):
        if key in r:
            result[key] = r[key]
    result.update(vae.structure.eval_extras(vae, ev))  # hierarchical: the KL of every group ...
    result["iwae_seconds"] = iwae_seconds
    if floor:
        rows = r["batch_size"] * r["sample_chunk"]
        fl = matmul_floor(vae, len(x), k, rows, r["precision"])
        if fl is not None:
            result.update(fl)
            result["floor_ratio"] = iwae_seconds / fl["floor_seconds"]
            if r["precision"] != "fp32":  # the floor of fp32 matmuls too, which bf16 may beat
                fp32 = matmul_floor(vae, len(x), k, rows, "fp32")
                assert fp32 is not None
                result["floor_seconds_fp32"] = fp32["floor_seconds"]
                result["floor_ratio_fp32"] = iwae_seconds / fp32["floor_seconds"]
    result["seconds"] = time.perf_counter() - t0
    return result
