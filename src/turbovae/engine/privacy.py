"""Differentially private training: DP-SGD (Abadi et al. 2016) with ``train.dp_epsilon > 0``.

Each step samples its batch by Poisson sampling (every training example in it with probability
q = train.batch_size / N, the sampling the accountant assumes; the loop's own batch is not used),
computes every example's gradient (``torch.func``: ``vmap`` of ``grad`` over the batch, so any model
and likelihood, no per-layer hooks), clips each to the L2 norm ``train.dp_max_grad_norm`` C, sums
them, adds Gaussian noise N(0, σ²C²) to every coordinate and divides by the expected batch qN. The
noise multiplier σ is the smallest that keeps the whole run (train.epochs × N // batch_size steps)
within (ε, δ) = (train.dp_epsilon, train.dp_delta) by opacus' RDP accountant; the (ε, δ) actually
spent (by the steps run) goes into summary.json as ``privacy``.

What is covered, and what is not, is in docs/tables.md#differential-privacy. In short: the weights
(and everything computed from them alone: samples, the checkpoint) are (ε, δ)-DP with respect to
the training examples; the data's preprocessing is not unless it was fitted without them (a table's
declared bounds), and the held-out and validation rows are not training rows.

Kept apart from the ordinary step (``step.py``): the loop builds this step instead of ``make_step``
when ``train.dp_epsilon`` is set, and runs it eagerly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config
from ..errors import ConfigError
from ..objectives import noise_shape_of
from .optim import Average, GradGuard
from .step import STATS, Task

if TYPE_CHECKING:
    from ..vae import VAE

INSTALL = "pip install 'turbovae[privacy]'"
ACCOUNTANT = "rdp"  # opacus' Rényi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019)


def private(cfg: Config) -> bool:
    return cfg.train.dp_epsilon > 0


def check(cfg: Config, world: int, precision: str, mapped: bool) -> None:
    """One ConfigError for a private run's settings that DP-SGD here cannot honour."""
    t = cfg.train
    if not 0 < t.dp_delta < 1:
        raise ConfigError(f"train.dp_delta must be in (0, 1), got {t.dp_delta} (usually below 1 / rows)")
    if t.dp_max_grad_norm <= 0:
        raise ConfigError(f"train.dp_max_grad_norm must be > 0, got {t.dp_max_grad_norm}")
    refused = {
        "torchrun (data-parallel) training": world > 1,
        "train.compile=on (the per-example gradients run eagerly)": t.compile == "on",
        f"precision {precision} (DP-SGD runs in fp32)": precision != "fp32",
        "train.skip_grad (it decides from the batch's gradient)": t.skip_grad > 0,
        "train.clip_grad (train.dp_max_grad_norm clips each example's gradient)": t.clip_grad > 0,
        "memory-mapped training data": mapped,
    }
    for what, bad in refused.items():
        if bad:
            raise ConfigError(f"train.dp_epsilon: differentially private training does not support {what}")
    accountant()


def accountant() -> Any:
    """opacus' RDP accountant, or a one-line ConfigError saying how to install opacus."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise ConfigError(f"train.dp_epsilon needs opacus, which is not installed: {INSTALL}") from None
    return RDPAccountant()


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (to opacus' tolerance) whose ``steps`` Poisson-sampled steps spend at most
    (ε, δ)."""
    accountant()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=max(steps, 1), accountant=ACCOUNTANT))  # fmt: skip


def spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """The ε that ``steps`` steps of noise multiplier σ and sampling rate q spend at δ."""
    if steps == 0:
        return 0.0
    acc = accountant()
    acc.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta))


def plan(cfg: Config, n_train: int, total_steps: int) -> dict[str, Any]:
    """The run's DP-SGD parameters (kept in the loop's state: a resumed run goes on with them)."""
    q = min(1.0, cfg.train.batch_size / n_train)
    sigma = noise_multiplier(cfg.train.dp_epsilon, cfg.train.dp_delta, q, total_steps)
    return {"noise_multiplier": sigma, "sample_rate": q, "max_grad_norm": cfg.train.dp_max_grad_norm,
            "planned_steps": total_steps, "n_train": n_train}  # fmt: skip


def report(cfg: Config, dp: dict[str, Any], steps: int, not_covered: list[str]) -> dict[str, Any]:
    """summary.json's ``privacy``: the (ε, δ) the run's steps spent, and how."""
    epsilon = spent(dp["noise_multiplier"], dp["sample_rate"], steps, cfg.train.dp_delta)
    return {"epsilon": epsilon, "delta": cfg.train.dp_delta, "target_epsilon": cfg.train.dp_epsilon,
            "accountant": ACCOUNTANT, "steps": steps, **dp, "sampling": "poisson",
            "not_covered": not_covered}  # fmt: skip


def make_private_step(
    vae: VAE,
    opt: torch.optim.Optimizer,
    cfg: Config,
    guard: GradGuard,
    ema: Average | None,
    data: tuple[torch.Tensor, torch.Tensor | None],
    dp: dict[str, Any],
    generator: torch.Generator,
    prepare: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """A DP-SGD step with the ordinary step's signature and ``STATS`` (``x`` and ``eps`` are ignored:
    the step draws its own Poisson batch of ``data`` = (x_train, y_train), prepared as the loop prepares
    its batches, and its noise)."""
    from torch.func import functional_call, grad, vmap

    x_train, y_train = data
    task = Task(vae, cfg)
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    q, sigma, clip = dp["sample_rate"], dp["noise_multiplier"], dp["max_grad_norm"]
    expected = q * len(x_train)
    found_inf = torch.zeros((), device=x_train.device)
    opt.found_inf = found_inf  # type: ignore[attr-defined]

    def loss_one(values: list[torch.Tensor], x: torch.Tensor, eps: torch.Tensor, beta: Any, y: Any) -> Any:
        args = (x[None], eps.unsqueeze(-2), beta) + (() if y is None else (y[None],))
        terms = functional_call(task, dict(zip(names, values, strict=True)), args)
        return terms["loss"], torch.stack([terms[k].float() for k in STATS[:4]])

    def step(
        x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None = None, y: Any = None
    ) -> torch.Tensor:
        device = x_train.device
        rows = torch.nonzero(torch.rand(len(x_train), generator=generator, device=device) < q).flatten()
        batch = prepare(x_train[rows]).float()
        labels = y_train[rows] if y_train is not None and y is not None else None
        shape = noise_shape_of(cfg.train.objective, len(rows), vae.latent, cfg.train.iwae_k)
        noise = torch.randn(shape, generator=generator, device=device)
        opt.zero_grad(set_to_none=True)
        if len(rows):
            dims = (None, 0, len(shape) - 2, None, None if labels is None else 0)
            per_example = vmap(grad(loss_one, has_aux=True), in_dims=dims, randomness="different")
            grads, terms = per_example([p.detach() for p in params], batch, noise, beta, labels)
            norms = torch.sqrt(sum(g.reshape(len(rows), -1).pow(2).sum(1) for g in grads))  # (m,)
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            summed = [torch.einsum("b,b...->...", factor, g) for g in grads]
            values = terms.mean(0)
        else:  # an empty batch: the noise alone (the accountant counts the step all the same)
            summed = [torch.zeros_like(p) for p in params]
            values = torch.full((4,), math.nan, device=device)
        for p, s in zip(params, summed, strict=True):
            p.grad = (s + sigma * clip * torch.randn(p.shape, generator=generator, device=device)) / expected
        keep = guard() & torch.isfinite(values).all()
        found_inf.copy_(~keep)
        opt.step()
        if ema is not None:
            ema.update()
        with torch.no_grad():
            flags = torch.stack([keep, ~keep]).float()
            return torch.cat([torch.where(keep, values, 0.0), flags, (guard.state["last_norm"] * keep)[None]])

    return step


__all__ = ["check", "make_private_step", "noise_multiplier", "plan", "private", "report", "spent"]
