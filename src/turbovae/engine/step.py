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


# layers whose weight and bias autocast casts to the reduced precision at every call, and nothing else
_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)  # fmt: skip


class LowPrecisionWeights:
    """Reduced-precision (bf16) copies of the weights and biases of a module's convolutions and linear
    layers, which its forward reads in their place (``call``): refreshed from the float32 parameters
    by one multi-tensor copy a step, their gradients widened into float32 ``.grad`` by another
    (``backward_into``). Under autocast each layer casts its weight and bias at every call and the
    backward casts each gradient back: two kernels per tensor a step (about 600 for fmnist-hvae-gpu;
    300 of them top-level operators). The values are the same bit for bit: the same rounding of the
    weights to bf16, the same bf16 gradients, the same exact widening.

    Only tensors of those layers (exactly those types: a subclass may read its weight otherwise, and
    a parametrised layer computes it) that no other module holds (a weight tied to an embedding is
    read in float32 there), float32 and trained."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        holders: dict[int, int] = {}
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None:
                    holders[id(p)] = holders.get(id(p), 0) + 1
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        for prefix, m in module.named_modules():
            if type(m) not in _CAST_LAYERS or torch.nn.utils.parametrize.is_parametrized(m):
                continue
            for name, p in m.named_parameters(recurse=False):
                if p.requires_grad and p.dtype == torch.float32 and holders[id(p)] == 1:
                    self.names.append(f"{prefix}.{name}" if prefix else name)
                    self.params.append(p)
        self.ids = {id(p) for p in self.params}
        self.copies = [torch.empty_like(p, dtype=dtype).requires_grad_() for p in self.params]
        self.grads = [torch.zeros_like(p) for p in self.params]  # float32, the parameters' strides

    def call(self, module: nn.Module, *args: object) -> dict[str, torch.Tensor]:
        """``module(*args)`` reading the reduced-precision copies, refreshed from the parameters first."""
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.params)
        tensors = dict(zip(self.names, self.copies, strict=True))
        return torch.func.functional_call(module, tensors, args, strict=False)


def backward_into(
    loss: torch.Tensor, params: Sequence[torch.Tensor], low: LowPrecisionWeights | None = None
) -> None:
    """``loss.backward()`` for parameters whose ``.grad`` is None: the gradients straight from the graph
    (``torch.autograd.grad``) into ``.grad``, without the AccumulateGrad node backward() runs per
    tensor (one operator call each: 301 for fmnist-hvae-gpu). The same values, bit for bit. A gradient
    AccumulateGrad would copy is copied too (rare: a view, such as an expand's gradient; one tensor
    that is two parameters' gradient, as of p1 + p2; other strides than the parameter's, which the
    multi-tensor kernels of the guard and the optimiser pair with it stride for stride). ``low``: the
    forward read these reduced-precision copies of some of ``params``; their gradients are widened
    into float32 buffers, one kernel."""
    rest = list(params) if low is None else [p for p in params if id(p) not in low.ids]
    copies = [] if low is None else low.copies
    grads = torch.autograd.grad(loss, [*copies, *rest], allow_unused=True)
    if low is not None:
        pairs = [(b, g, p) for b, g, p in zip(low.grads, grads, low.params, strict=False) if g is not None]
        if pairs:
            torch._foreach_copy_([b for b, _, _ in pairs], [g for _, g, _ in pairs])
        for b, _, p in pairs:
            p.grad = b
    owned: set[int] = set()
    for p, g in zip(rest, grads[len(copies) :], strict=True):
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
    task = Task(vae, cfg) if forward is None else None
    objective = forward if forward is not None else task
    assert objective is not None
    # reduced precision inside the objective's forward only (runtime decides how, once, here)
    forward = runtime.with_precision(objective, device, precision)
    # bf16: the layers read bf16 copies of their weights made in one kernel, not one cast each (not
    # with DDP, which syncs the parameters' gradients, nor while torch.compile traces the step)
    low = LowPrecisionWeights(task, torch.bfloat16) if task is not None and precision == "bf16" else None
    low = low if low is not None and low.params else None
    low_forward = None
    if low is not None and task is not None:
        low_forward = runtime.with_precision(functools.partial(low.call, task), device, precision)
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
            backward_into(loss, params, low)
        else:
            loss.backward()

    def step(
        x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``beta``: this step's KL weight (a 0-dim tensor, under a KL schedule), else train.beta;
        ``y``: the class ids (B,) of a conditional run's batch."""
        run = forward if low_forward is None or torch.compiler.is_compiling() else low_forward
        terms = run(x, eps, beta) if y is None else run(x, eps, beta, y)
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
