"""Held-out evaluation: NELBO (split into reconstruction and KL), the IWAE log-likelihood estimate with
its standard error, bits/dim, active units, KL per latent dimension and the mutual information I(x; z).

All values are in nats per example unless the name says otherwise. ``evaluate`` computes everything
that ``turbovae eval --json`` prints; the pieces are public for use in your own code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import runtime
from ..data.text import trim
from ..errors import DataError
from ..vae import VAE

Prepare = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int], None]  # called with the number of examples each batch finished

LOG_2PI = math.log(2.0 * math.pi)
# decoder output values per IWAE chunk: 2^22 floats (16 MiB) keeps the matmuls large (≈5,000 rows of
# a 784-pixel decoder) while a chunk's intermediates stay well under 100 MiB at any k
CHUNK_VALUES = 1 << 22
# `precision="auto"` evaluates the first BF16_CHECK_EXAMPLES examples both ways with the same samples and
# keeps bf16 only if the mean estimate moves by less than BF16_TOLERANCE nats (|mean| + 2 s.e. of the
# per-example differences): well inside the 0.05 nats that would matter when comparing models
BF16_TOLERANCE = 0.02
BF16_CHECK_EXAMPLES = 32


def default_prepare(vae: VAE, x: torch.Tensor) -> Prepare:
    """What the evaluation functions do to ``x`` without a ``prepare``: token ids (int64, text) are cut
    to each batch's longest line; other integers are stored values divided by the run's
    ``vae.max_value`` as in training (bytes / 255), except 0/1 arrays (binarised draws, such as a
    binarised run's stored test split), which are taken as they are; floats are taken as already
    prepared. A run whose likelihood needs binary data gets an error for other values (its test set
    is a fixed Bernoulli draw: pass that, or its ``prepare``)."""
    if x.dtype == torch.int64:
        return trim
    binary_draws = not x.dtype.is_floating_point and (x.numel() == 0 or int(x.max()) <= 1)
    scale = 1.0 if x.dtype.is_floating_point or binary_draws else vae.max_value

    def prepare(raw: torch.Tensor) -> torch.Tensor:
        out = raw.float() if scale == 1.0 else raw.float() / scale
        if vae.likelihood.support == "binary" and bool(((out != 0) & (out != 1)).any()):
            raise DataError(
                f"likelihood '{vae.likelihood.name}' scores binary data, but x has values other than 0 "
                "and 1: binarise it (the run's own binarised test set: x, prepare = setup(vae.config, "
                "device, vae.data_meta).split('test')), or pass prepare"
            )
        return out

    return prepare


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def _rank_share(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's examples, the number of ranks): under torch.distributed with several ranks (a
    data-parallel run), rows rank::world of ``x``; else all of ``x`` and 1."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x, 1
    world = torch.distributed.get_world_size()
    return x[torch.distributed.get_rank() :: world], world


def _sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) summed over the ranks, back on the CPU (NCCL reduces device tensors)."""
    buf = t.to(device)
    torch.distributed.all_reduce(buf)
    return buf.cpu()


class EvalMode:
    """Puts the model in eval mode for the block and restores its previous mode after."""

    def __init__(self, vae: nn.Module) -> None:
        self.vae, self.was_training = vae, vae.training

    def __enter__(self) -> None:
        self.vae.eval()

    def __exit__(self, *exc: object) -> None:
        self.vae.train(self.was_training)


@torch.no_grad()
def nelbo(
    vae: VAE,
    x: torch.Tensor,
    prepare: Prepare | None = None,
    *,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    y: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Single-sample NELBO per example over all of ``x`` (an unbiased estimate), with rec and KL; a
    hierarchical model also gets ``kl_groups``, the mean KL of every latent group, top group first
    (they sum to ``kl``). A conditional model takes the class ids ``y`` (N,) of ``x``: the bound on
    −log p(x | y).

    Under torch.distributed with several ranks, each rank evaluates its share of ``x`` (rows
    rank::world) and the sums are all-reduced: every rank must call it, and every rank gets the totals.
    Without ``prepare``, ``default_prepare``."""
    prepare = prepare or default_prepare(vae, x)
    groups_of = vae.structure.groups(vae)  # latent groups whose KLs are reported one by one
    totals = torch.zeros(3 + len(groups_of), dtype=torch.float64)
    part, world = _rank_share(x)
    labels = _rank_share(y)[0] if y is not None else None
    with EvalMode(vae):
        for start, raw in enumerate(batches(part, batch_size)):
            xb = prepare(raw)
            yb = None if labels is None else labels[start * batch_size : start * batch_size + len(xb)]
            t = vae.structure.terms(vae, xb, generator=generator, y=yb)  # the training terms, once
            rec, kl = t.rec, t.kl
            groups = t.kl_groups.sum(0) if t.kl_groups is not None else kl.new_zeros(0)  # top group first
            totals += torch.cat([torch.stack([(rec + kl).sum(), rec.sum(), kl.sum()]), groups]).double().cpu()
    if world > 1:
        totals = _sum_over_ranks(totals, x.device)
    n = len(x)
    means = (totals / n).tolist()
    out: dict[str, Any] = {"nelbo": means[0], "rec": means[1], "kl": means[2]}
    if groups_of:
        out["kl_groups"] = means[3:]
    return out


# ---- the importance-weighted estimate --------------------------------------------------------------


def plan_chunks(
    vae: VAE,
    n: int,
    k: int,
    batch_size: int | None = None,
    sample_chunk: int | None = None,
    max_values: int = CHUNK_VALUES,
) -> tuple[int, int]:
    """(examples per batch, samples per chunk) for an IWAE pass over ``n`` examples with ``k`` samples.

    One chunk decodes ``examples × samples`` latents; its decoder output is kept near ``max_values``
    values so that memory is bounded for any k while the decoder's matmuls stay large. The samples are
    split into equal chunks (no small remainder chunk).
    """
    out_values = max(1, math.prod(vae.event_shape) * vae.likelihood.params_per_dim)
    # a convolutional decoder keeps more alive per example than its output (hvae says how much)
    out_values = max(out_values, int(getattr(vae.net, "activation_values", 0)))
    rows = max(1, max_values // out_values)  # latents decoded per chunk
    if batch_size is None:
        # several examples share a chunk when k is small; one example's samples fill it when k is large
        batch_size = max(1, min(n, rows // k))
    if sample_chunk is None:
        sample_chunk = max(1, min(k, rows // batch_size))
        sample_chunk = math.ceil(k / math.ceil(k / sample_chunk))  # equal chunks
    return max(1, min(batch_size, max(n, 1))), max(1, min(sample_chunk, k))


def _batch_log_px(
    vae: VAE,
    xb: torch.Tensor,
    q: Any,
    k: int,
    chunk: int,
    generator: torch.Generator | None,
    precision: str,
    yb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-mean-exp of the k log-weights, log of Σw²) per example, float64, streamed over chunks."""
    lse = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=xb.device)
    lse2 = lse.clone()
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = torch.randn(vae.structure.noise_shape(vae, len(xb), c), generator=generator, device=xb.device)
        log_px_z, log_ratio, _ = vae.structure.log_weights(
            vae, xb, q, eps, yb, precision=precision, grad=False
        )
        lw = (log_px_z + log_ratio).double()  # (c, B)
        lse = torch.logaddexp(lse, torch.logsumexp(lw, 0))
        lse2 = torch.logaddexp(lse2, torch.logsumexp(2.0 * lw, 0))
    return lse - math.log(k), lse2


def _shift_bound(deltas: torch.Tensor) -> float:
    """|mean| + 2 standard errors of per-example differences: how far the mean estimate may move."""
    spread = deltas.std().item() / math.sqrt(len(deltas)) if len(deltas) > 1 else 0.0
    return abs(deltas.mean().item()) + 2.0 * spread


def _generator_state(generator: torch.Generator | None) -> torch.Tensor:
    return generator.get_state() if generator is not None else torch.get_rng_state()


def _set_generator_state(generator: torch.Generator | None, state: torch.Tensor) -> None:
    if generator is not None:
        generator.set_state(state)
    else:
        torch.set_rng_state(state)


@torch.no_grad()
def iwae_log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    prepare: Prepare | None = None,
    *,
    k: int,
    batch_size: int | None = None,
    sample_chunk: int | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
    y: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per-example importance-weighted estimates of log p(x) with k samples (Burda et al. 2015).

    Each example is encoded once; only the decoder runs k times, in chunks chosen by ``plan_chunks``.
    log-mean-exp is streamed in float64. ``precision`` is ``fp32``, ``bf16`` (decoder matmuls under
    bf16 autocast; the likelihood sums stay float32) or ``auto``: where bf16 matmuls are fast, the
    first ``BF16_CHECK_EXAMPLES`` examples are evaluated both ways with the same samples and bf16 is
    kept for the rest only if the mean estimate moves by less than ``BF16_TOLERANCE`` nats.

    Returns ``log_px`` (N,) float64 on the CPU, ``ess`` (N,) — the effective sample size
    (Σw)²/Σw² of each example's weights —, the ``precision`` used and, for ``auto`` where bf16 is
    fast, ``bf16_delta`` (mean bf16 − fp32 difference of the checked examples, nats) and
    ``bf16_delta_bound`` (its |mean| + 2 s.e., what was compared with the tolerance).

    A conditional model takes the class ids ``y`` (N,) of ``x``: estimates of log p(x | y).
    ``prepare`` maps stored values to the model's input (default: ``default_prepare``); ``progress``,
    if given, is called with the number of examples of every finished batch (for a progress bar).
    """
    prepare = prepare or default_prepare(vae, x)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    batch, chunk = plan_chunks(vae, len(x), k, batch_size, sample_chunk)
    log_px: list[torch.Tensor] = []
    ess: list[torch.Tensor] = []
    deltas: list[torch.Tensor] = []  # bf16 − fp32 per example, while `auto` is deciding
    use = precision
    if use == "auto" and not runtime.fast_bf16(x.device):
        use = "fp32"
    with EvalMode(vae):
        for start, raw in enumerate(batches(x, batch)):
            xb = prepare(raw)
            yb = None if y is None else y[start * batch : start * batch + len(xb)]
            q = vae.structure.encoded(vae, xb, yb)  # once per example: only the decoder runs k times
            if use == "auto":
                # the same samples both ways: the difference is the rounding alone
                state = _generator_state(generator)
                lse, lse2 = _batch_log_px(vae, xb, q, k, chunk, generator, "fp32", yb)
                _set_generator_state(generator, state)
                low, _ = _batch_log_px(vae, xb, q, k, chunk, generator, "bf16", yb)
                deltas.append((low - lse).cpu())
                d = torch.cat(deltas)
                if len(d) >= BF16_CHECK_EXAMPLES:
                    use = "bf16" if _shift_bound(d) < BF16_TOLERANCE else "fp32"
            else:
                lse, lse2 = _batch_log_px(vae, xb, q, k, chunk, generator, use, yb)
            log_px.append(lse.cpu())
            if progress is not None:
                progress(len(raw))
            # ESS = (Σw)² / Σw² = exp(2·log Σw − log Σw²), with log Σw = lse + log k
            ess.append(torch.exp(2.0 * (lse + math.log(k)) - lse2).cpu())
    if use == "auto":  # fewer examples than the check needs: all of them were computed in fp32
        use = "fp32"
    result: dict[str, Any] = {
        "log_px": torch.cat(log_px),
        "ess": torch.cat(ess),
        "k": k,
        "precision": use,
        "batch_size": batch,
        "sample_chunk": chunk,
    }
    if deltas:
        d = torch.cat(deltas)
        result["bf16_delta"] = d.mean().item()
        result["bf16_delta_bound"] = _shift_bound(d)
    return result


@torch.no_grad()
def iwae_nll(
    vae: VAE,
    x: torch.Tensor,
    prepare: Prepare | None = None,
    *,
    k: int,
    batch_size: int | None = None,
    sample_chunk: int | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
    y: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """−log p(x) estimated with k importance samples per example (Burda et al. 2015), in nats.

    Memory is bounded by chunking over examples (``batch_size``) and samples (``sample_chunk``); both
    default to ``plan_chunks``' choice. Returns the mean over examples ``nll``, its standard error
    ``stderr`` (the spread of the per-example estimates over examples / √n: the uncertainty that
    comes from which examples are in the test set), ``k``, ``n``, the mean effective sample size
    ``ess`` and the ``precision`` used (see ``iwae_log_likelihood``). Under torch.distributed with
    several ranks, split over the ranks like ``nelbo`` (each needs at least one example). A
    conditional model takes the class ids ``y`` (N,): −log p(x | y).
    several ranks, split over the ranks like ``nelbo`` (each needs at least one example).

    ``prepare`` maps stored values to the model's input; without it, integer data (bytes) are divided
    by the run's ``vae.max_value`` and floats are taken as prepared (see ``default_prepare``):
    ``iwae_nll(vae, x_float, k=100)``. ``progress`` is called with the examples each batch finished
    (over all ranks: this rank's count times the number of ranks).
    """
    prepare = prepare or default_prepare(vae, x)
    part, world = _rank_share(x)
    labels = _rank_share(y)[0] if y is not None else None
    r = iwae_log_likelihood(
        vae,
        part,
        prepare,
        k=k,
        batch_size=batch_size,
        sample_chunk=sample_chunk,
        generator=generator,
        precision=precision,
        y=labels,
        progress=None if progress is None else (lambda n: progress(n * world)),
    )
    nll = -r["log_px"]
    stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    out = {
        "nll": nll.mean().item(),
        "stderr": stderr,
        "k": k,
        "n": len(nll),
        "ess": r["ess"].mean().item(),
        "precision": r["precision"],
    }
    if world > 1:  # the moments summed over the ranks
        n, total, squares, ess = _sum_over_ranks(
            torch.stack([torch.tensor(float(len(nll)), dtype=torch.float64), nll.sum(), nll.square().sum(),
                         r["ess"].double().sum()]), x.device).tolist()  # fmt: skip
        variance = max(squares - total * total / n, 0.0) / (n - 1) if n > 1 else math.nan
        out.update(nll=total / n, stderr=math.sqrt(variance / n), n=int(n), ess=ess / n)
    for key in ("bf16_delta", "bf16_delta_bound"):
        if key in r:
            out[key] = r[key]
    return out


def bits_per_dim(nats: float, dims: int) -> float:
    """nats per example → bits per data dimension."""
    return nats / (dims * math.log(2.0))


# ---- the posterior: active units, KL per dimension, mutual information ------------------------------


# ---- the matmul-bound floor --------------------------------------------------------------------------


# ---- everything at once ------------------------------------------------------------------------------
