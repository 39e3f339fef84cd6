"""One optimisation step: the VAE and its objective as one module (``Task``) and ``make_step``, which
returns the step's statistics on the device (no host sync: it can be compiled or graph-captured).
The loss itself is computed in turbovae.objectives."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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


def backward_into(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """``loss.backward()`` for parameters whose ``.grad`` is None: the gradients straight from the graph
    (``torch.autograd.grad``) into ``.grad``, without the AccumulateGrad node backward() runs per
    tensor (one operator call each: 301 for fmnist-hvae-gpu). The same values, bit for bit. A gradient
    AccumulateGrad would copy is copied too (rare: a view, such as an expand's gradient; one tensor
    that is two parameters' gradient, as of p1 + p2; other strides than the parameter's, which the
    multi-tensor kernels of the guard and the optimiser pair with it stride for stride)."""
    owned: set[int] = set()
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
        if g is None:
            continue
        if g._base is not None or g.stride() != p.stride() or g.data_ptr() in owned:
            g = torch.empty_like(p).copy_(g)
        owned.add(g.data_ptr())
        p.grad = g


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
    # the gradients straight into .grad (backward_into), but with DDP, whose gradient sync hooks on
    # backward()'s AccumulateGrad nodes, and while torch.compile traces the step
    direct = forward is None
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

    def backward(loss: torch.Tensor) -> None:
        if direct and not torch.compiler.is_compiling():
            backward_into(loss, params)
        else:
            loss.backward()

    def step(
        x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``beta``: this step's KL weight (a 0-dim tensor, under a KL schedule), else train.beta;
        ``y``: the class ids (B,) of a conditional run's batch."""
        terms = forward(x, eps, beta) if y is None else forward(x, eps, beta, y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: the scaler skips non-finite steps itself
            backward(scaler.scale(terms["loss"]))
            scaler.unscale_(opt)
            keep = guard()
            scaler.step(opt)
            scaler.update()
        else:
            backward(terms["loss"])
            keep = guard()
            found_inf.copy_(~keep)  # 1: the optimiser skips the step
            opt.step()
        if ema is not None:
            ema.update()
        with torch.no_grad():  # a few whole-vector kernels: this runs every step
            values = torch.stack([terms[k] for k in STATS[:4]])
            values = torch.where(keep, values if values.dtype == torch.float32 else values.float(), 0.0)
            flags = torch.stack([keep, ~keep]).float()
            return torch.cat([values, flags, (guard.state["last_norm"] * keep)[None]])

    return step
