"""One optimisation step: the VAE and its objective as one module (``Task``) and ``make_step``, which
returns the step's statistics on the device (no host sync: it can be compiled or graph-captured).
The loss itself is computed in turbovae.objectives."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .. import runtime
from ..config import Config
from ..errors import ConfigError
from ..objectives import get_objective
from ..vae import VAE
from . import optim
from .optim import Average, GradGuard


def kl_weight(
    cfg: Config, step: int, device: torch.device | None = None, total_steps: int = 1
) -> torch.Tensor:
    """β of the 0-based global ``step`` (KL warm-up or cyclical annealing, see optim.kl_weight_at), a 0-dim
    tensor (a step argument, so that the compiled step is not specialised on it)."""
    return torch.tensor(optim.kl_weight_at(cfg, step, total_steps), device=device)


# The step's statistics, accumulated on the device and read back at the log interval: the four loss
# terms summed over the applied steps, the number of applied steps, of skipped ones, and the gradient
# norm summed over the applied steps.
STATS = ("loss", "nelbo", "rec", "kl", "applied", "skipped", "grad_norm")


class Task(nn.Module):
    """The VAE and its objective as one module (timm's Task): ``forward(x, eps, beta)`` returns the
    objective's terms. Data-parallel runs wrap it in DDP, which syncs what runs through its forward."""

    def __init__(self, vae: VAE, cfg: Config) -> None:
        super().__init__()
        self.vae = vae
        self.objective = functools.partial(get_objective(cfg.train.objective), beta=cfg.train.beta,
                                           k=cfg.train.iwae_k, free_bits=cfg.train.free_bits)  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``y``: the batch's class ids (B,) of a conditional run (data.condition), else None."""
        if y is not None:
            if beta is None:
                return self.objective(self.vae, x, eps=eps, y=y)
            return self.objective(self.vae, x, eps=eps, beta=beta, y=y)
        if beta is None:
            return self.objective(self.vae, x, eps=eps)
        return self.objective(self.vae, x, eps=eps, beta=beta)


def make_step(
    vae: VAE,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    device: torch.device,
    precision: str = "fp32",
    guard: GradGuard | None = None,
    ema: Average | None = None,
    forward: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> Callable[..., torch.Tensor]:
    """One optimisation step on a prepared batch ``x`` with reparameterisation noise ``eps``: the loss,
    its gradient, the guard (clipping; a NaN/Inf or, with train.skip_grad, an outlying gradient skips
    the step through the optimiser's found_inf), the update and the weight average.

    ``forward``: the objective's forward ``(x, eps, beta) -> terms``, by default ``Task(vae, cfg)``;
    data-parallel runs pass the DDP-wrapped Task, whose backward averages the gradients over the ranks
    (the guard then sees the same global gradient on every rank, so skip decisions agree).

    Returns the ``STATS`` vector on the device: nothing here waits for the device, so the whole step
    can be compiled, or captured as one CUDA graph.
    """
    # reduced precision inside the objective's forward only (runtime decides how, once, here)
    forward = runtime.with_precision(forward or Task(vae, cfg), device, precision)
    params = [p for p in vae.parameters() if p.requires_grad]
    guard = guard or GradGuard(cfg, params, device)
    if scaler is not None and cfg.train.skip_grad:
        raise ConfigError(
            "train.skip_grad needs precision bf16 or fp32 (fp16's scaler already skips inf steps)"
        )

    # the optimiser reads its skip flag from this tensor (set once here: an attribute assignment inside
    # the step would break torch.compile's tracing on some versions)
    found_inf = torch.zeros((), device=device)
    if scaler is None:
        opt.found_inf = found_inf  # type: ignore[attr-defined]

    def step(
        x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``beta``: this step's KL weight (a 0-dim tensor, under a KL schedule), else train.beta;
        ``y``: the class ids (B,) of a conditional run's batch."""
        terms = forward(x, eps, beta) if y is None else forward(x, eps, beta, y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: the scaler skips non-finite steps itself
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(opt)
            keep = guard()
            scaler.step(opt)
            scaler.update()
        else:
            terms["loss"].backward()
            keep = guard()
            found_inf.copy_(~keep)  # 1: the optimiser skips the step
            opt.step()
        if ema is not None:
            ema.update()
        zero = torch.zeros((), device=device)
        values = [torch.where(keep, terms[k].detach().float(), zero) for k in STATS[:4]]
        return torch.stack([*values, keep.float(), (~keep).float(), guard.state["last_norm"] * keep])

    return step
