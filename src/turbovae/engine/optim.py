"""Optimisers, learning-rate schedules, the gradient guard and weight averaging.

Everything the training step does after ``backward`` lives here, and all of it runs on the device:
the learning rate is a tensor the schedule fills in, a bad step is skipped through the optimiser's
``found_inf`` (no host sync, so the step can be compiled or captured as one CUDA graph), and the
weight average is a ``lerp`` of the parameters.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from .. import runtime
from ..config import Config
from ..errors import ConfigError

# ---- optimisers -------------------------------------------------------------------------------------


class _Eager(torch.optim.Optimizer):
    """torch.optim.Optimizer's methods as they run outside torch.compile. torch wraps them in
    ``torch._disable_dynamo`` (and Adam's step in a graph break), whose first call imports
    torch._dynamo: about 1 s of every run's start on a 2-core AMD EPYC, 1.6-3 s on the Intel Xeon.
    While torch.compile traces a step (``torch.compiler.is_compiling()``), the wrapped methods run,
    as before. ``add_param_group`` and the state-dict methods are never traced."""

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if torch.compiler.is_compiling():
            torch.optim.Optimizer.zero_grad(self, set_to_none)
            return
        if not set_to_none:
            inspect.unwrap(torch.optim.Optimizer.zero_grad)(self, False)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def _eager_step(base: type[torch.optim.Optimizer]) -> Any:
    """``base.step`` without its graph break (see ``_Eager``), under no_grad as torch runs it. Under
    torch.compile, torch's own step (graph break included) without the step-hook wrapper torch puts on
    a class once it is instantiated: this class's step has that wrapper already, so hooks run once."""
    plain, traced = inspect.unwrap(base.step), cast(Any, base.step)
    while getattr(traced, "hooked", False):  # Optimizer._patch_step_function's profile_hook_step
        traced = traced.__wrapped__

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        if torch.compiler.is_compiling():
            return traced(self, closure)
        with torch.no_grad():
            return plain(self, closure)

    return step


class _Adam(_Eager, torch.optim.Adam):
    step = _eager_step(torch.optim.Adam)


class _AdamW(_Eager, torch.optim.AdamW):
    step = _eager_step(torch.optim.AdamW)


class _Skippable(_Eager):
    """An optimiser that honours ``self.found_inf`` (a 0-dim float tensor: 1 skips the step entirely,
    state included), as torch's fused Adam/AdamW do. Written with torch.where, so a NaN gradient of a
    skipped step leaves no trace."""

    found_inf: torch.Tensor | None = None

    def _keep(self, p: torch.Tensor) -> torch.Tensor:
        if self.found_inf is None:
            return torch.ones((), dtype=torch.bool, device=p.device)
        flag = self.found_inf if self.found_inf.device == p.device else self.found_inf.to(p.device)
        return flag == 0


def _pick(keep: torch.Tensor, applied: float, skipped: float) -> torch.Tensor:
    """``applied`` where ``keep`` (a 0-dim bool) else ``skipped``, a 0-dim float32 tensor on its device:
    one kernel, the two numbers its arguments (nothing copied from the host: a CUDA graph captures it)."""
    return torch.where(keep, applied, skipped)


_TINY = torch.finfo(torch.float32).tiny
# the integer type of a float's bits (the same size), for a multiply that keeps or clears them exactly
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}  # fmt: skip


class _CleanGradients:
    """Persistent copies of a parameter list's gradients that a skipped step clears, NaN and all, in two
    multi-tensor kernels: the gradients are copied in, then their bits are multiplied, as integers, by
    1 (applied: every bit kept) or 0 (skipped: +0.0). ``torch.where(keep, g, 0)`` did the same one
    tensor at a time (301 kernels for fmnist-hvae-gpu), and a float multiply by 0 keeps a NaN."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.ids = [id(p) for p in params]
        self.buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.bits: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self.buffers:
            self.bits.setdefault(b.dtype, []).append(b.view(_BITS[b.dtype]) if b.dtype in _BITS else b)

    def fill(self, grads: list[torch.Tensor], keep: torch.Tensor, params: list[torch.Tensor],
             weight_decay: float = 0.0) -> list[torch.Tensor]:  # fmt: skip
        """``grads`` (of the parameters this was made for) + ``weight_decay`` × ``params``, all zero
        where not ``keep`` (a 0-dim bool)."""
        torch._foreach_copy_(self.buffers, grads)
        if weight_decay:
            torch._foreach_add_(self.buffers, params, alpha=weight_decay)
        for dtype, bits in self.bits.items():  # (one dtype in practice: one kernel)
            torch._foreach_mul_(bits, keep.to(_BITS.get(dtype, dtype)))  # (complex: a float multiply)
        return self.buffers

    def fits(self, params: list[torch.Tensor]) -> bool:
        return [id(p) for p in params] == self.ids


class Adamax(_Skippable):
    """Adamax (Kingma & Ba 2015, section 7.1), Efficient-VDVAE's optimiser: the second moment is an
    infinity norm, u = max(β₂·u, |g| + ε), so one huge gradient cannot inflate the step size."""

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One update of all of a group's tensors in a few multi-tensor (foreach) kernels: the update
        of one tensor at a time took 66 ops per tensor (20,000 for the 301 tensors of fmnist-hvae-gpu,
        each a kernel launch on a GPU). A skipped step (found_inf) leaves everything as it was: its
        gradients are replaced by zeros and its mixing weights are those of no change."""
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2 = group["betas"]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), device=p.device)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_inf"] = torch.zeros_like(p)
            keep = self._keep(params[0])
            k = keep.float()  # 1: apply, 0: skip
            # the gradients (plus the weight decay) in persistent buffers, all zero on a skipped step:
            # its NaN never enters
            cleans = self.__dict__.setdefault("_clean", {})
            clean = cleans.get(index)
            if clean is None or not clean.fits(params):
                clean = cleans[index] = _CleanGradients(params)
            grads = clean.fill([p.grad for p in params if p.grad is not None], keep, params,
                               group["weight_decay"])  # fmt: skip
            ms, us = [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_inf"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            # m ← β₁ m + (1 − β₁) g; u ← max(β₂ u, |g| + ε); skipped: m ← m, u ← max(u, 0) = u
            torch._foreach_mul_(ms, _pick(keep, b1, 1.0))
            torch._foreach_add_(ms, torch._foreach_mul(grads, _pick(keep, 1.0 - b1, 0.0)))
            torch._foreach_mul_(us, _pick(keep, b2, 1.0))
            fresh = torch._foreach_abs(grads)
            torch._foreach_add_(fresh, group["eps"])
            torch._foreach_mul_(fresh, k)
            torch._foreach_maximum_(us, fresh)
            torch._foreach_add_(steps, [k] * len(steps))  # (a list: the one-tensor form reads k on a CPU)
            # θ ← θ − lr / (1 − β₁ᵗ) · m / u (t ≥ 1: a skipped first step divides by nothing)
            sizes = torch._foreach_pow(b1, torch._foreach_clamp_min(steps, 1.0))
            torch._foreach_neg_(sizes)
            torch._foreach_add_(sizes, 1.0)
            torch._foreach_reciprocal_(sizes)
            torch._foreach_mul_(sizes, group["lr"] * k)
            # u ≥ ε once a step applied; a skipped first step's u = 0 (and m = 0) is divided as u = tiny:
            # no 0/0
            updates = torch._foreach_div(ms, torch._foreach_clamp_min(us, _TINY))
            torch._foreach_mul_(updates, sizes)
            torch._foreach_sub_(params, updates)


class SGD(_Skippable):
    """SGD with Nesterov momentum (torch's convention: v = μ·v + g, step g + μ·v) that can skip a step."""

    def __init__(self, params: Any, lr: float | torch.Tensor = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                keep = self._keep(p)
                g = p.grad if not group["weight_decay"] else p.grad + group["weight_decay"] * p
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                v = torch.where(keep, st["momentum_buffer"] * mu + g, st["momentum_buffer"])
                p.copy_(torch.where(keep, p - group["lr"] * (g + mu * v), p))
                st["momentum_buffer"].copy_(v)


def _schedule_free(
    params: list[nn.Parameter],
    lr: torch.Tensor,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """schedulefree's AdamWScheduleFree (Defazio et al. 2024; a dependency of turbovae)
    made to follow the loop's conventions: its rate read from the tensor ``lr_now`` each step (the loop's
    warm-up and roll-back halving fill it in; the library's own warm-up is not used) and ``found_inf``
    honoured by skipping the step. On the CPU both are host reads and the group's scalars (``k``,
    ``weight_sum``, ``lr_max``) host numbers, as in the library. On CUDA (``device_scalars``) the scalars
    live on the device and the step reads nothing back, so the loop captures it in the step's CUDA graph;
    ``sync_host`` and ``sync_device`` move them between the group and the device (checkpoints, the
    roll-back snapshot and the noise probe read the group). train.compile is not used with it. The
    weights it evaluates are the average x, not the training point y the parameters hold:
    ``ScheduleFreeAverage`` swaps them in."""
    try:
        import schedulefree
    except ImportError:
        raise ConfigError(
            "train.optimizer=schedulefree needs the schedulefree package: pip install schedulefree"
        ) from None

    class SkippableAdamWScheduleFree(_Eager, schedulefree.AdamWScheduleFree):
        found_inf: torch.Tensor | None = None
        lr_now: torch.Tensor
        device_scalars = False  # CUDA: k, weight_sum and lr_max kept on the device (see the docstring)
        _scalars: list[dict[str, torch.Tensor]] | None = None

        def state_dict(self) -> dict[str, Any]:
            self.sync_host()
            return dict(_Eager.state_dict(self))

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            _Eager.load_state_dict(self, state_dict)
            self.sync_device()

        @torch.no_grad()
        def reset_state(self) -> None:
            """A fresh state, in place: z = y and no second moments, what the first step makes (zeros
            would pull x towards 0), in the tensors a captured step holds."""
            for state, p in ((self.state[p], p) for g in self.param_groups for p in g["params"]):
                if "z" in state:
                    state["z"].copy_(p)
                    state["exp_avg_sq"].zero_()

        def sync_host(self) -> None:
            """The device's k, weight_sum and lr_max into the groups (reads the device: not in a step)."""
            if self._scalars is None:
                return
            for group, dev in zip(self.param_groups, self._scalars, strict=True):
                group["k"] = round(dev["k"].item())
                group["weight_sum"], group["lr_max"] = dev["weight_sum"].item(), dev["lr_max"].item()
                group["lr"] = float(self.lr_now)

        def sync_device(self) -> None:
            """The groups' scalars onto the device, in place (a captured step holds these tensors)."""
            if not self.device_scalars:
                return
            device = self.lr_now.device
            if self._scalars is None:
                self._scalars = [{key: torch.zeros((), dtype=torch.float64, device=device)
                                  for key in _DEVICE_SCALARS} for _ in self.param_groups]  # fmt: skip
            with torch.no_grad():
                for group, dev in zip(self.param_groups, self._scalars, strict=True):
                    for key in _DEVICE_SCALARS:
                        dev[key].fill_(float(group[key]))

        @torch.no_grad()
        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            actives = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
            fusable = all(_fusable(g, a) for g, a in zip(self.param_groups, actives, strict=True))
            if self.device_scalars and fusable and self.found_inf is not None:
                if self._scalars is None:
                    self.sync_device()
                assert self._scalars is not None
                for group, active, dev in zip(self.param_groups, actives, self._scalars, strict=True):
                    _schedule_free_fused_on_device(self, group, active, dev)
                return
            self.sync_host()  # the host's step (CPU, or a case the device step does not cover)
            if self.found_inf is not None and bool(self.found_inf.item()):
                return
            for group in self.param_groups:
                group["lr"] = float(self.lr_now)
            if fusable:
                for group, active in zip(self.param_groups, actives, strict=True):
                    _schedule_free_fused(self, group, active)
            else:
                super().step()
            self.sync_device()

    opt = SkippableAdamWScheduleFree(  # type: ignore[call-arg]  # (schedulefree has no type hints)
        params, lr=float(lr), betas=betas, weight_decay=weight_decay, warmup_steps=0
    )
    opt.lr_now = lr
    # on CUDA where the device step applies (not with weight decay: the library's step takes that)
    opt.device_scalars = lr.device.type == "cuda" and not weight_decay
    opt.train()  # the library's mode flag; the parameters always hold y (ScheduleFreeAverage swaps x in)
    return opt


def _fusable(group: dict[str, Any], active: list[torch.Tensor]) -> bool:
    """Whether ``_schedule_free_fused`` applies: not with weight decay (the library takes it at y), the
    library's own warm-up, other dtypes or devices than float32 on one CPU or CUDA device, or sparse
    gradients, a schedulefree version whose groups lack the step's keys; then the library's step runs.
    ``active``: the group's parameters that have a gradient."""
    keys = ("k", "r", "weight_lr_power", "lr_max", "weight_sum", "warmup_steps", "eps", "betas")
    if not all(key in group for key in keys):
        return False
    return not (group["weight_decay"] or group["k"] < group["warmup_steps"] or not active
                or any(p.dtype != torch.float32 or p.device.type not in ("cpu", "cuda") or p.grad is None
                       or p.grad.is_sparse or p.device != active[0].device for p in active))  # fmt: skip


@torch.no_grad()
def _schedule_free_fused(
    opt: torch.optim.Optimizer, group: dict[str, Any], active: list[torch.Tensor]
) -> None:
    """schedulefree's AdamWScheduleFree step for one parameter group on torch's fused Adam kernel: the
    same update (its z step is Adam with β₁ = 0), in 4 passes over the parameters instead of the
    library's 9 foreach kernels (1.06 against 1.35 ms on the 653k-parameter MLP). The same state
    (``z``, ``exp_avg_sq``; ``k``, ``weight_sum``, ``lr_max`` in the group), so checkpoints, the average
    and the library's own step are interchangeable. Only where ``_fusable(group, active)``."""
    beta1, beta2 = group["betas"]
    k, lr = group["k"], group["lr"]
    group["scheduled_lr"] = lr
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    ckp1 = weight / weight_sum if weight_sum else 0.0
    zs, buffers, sqs, steps = _fused_state(opt, active)
    # y ← (1 − c) y + c z − lr (1 − β₁(1 − c)) ĝ, z ← z − lr ĝ (ĝ: the gradient over Adam's
    # denominator): y moves by the same multiple of z's step, ratio·(z_new − z_old)
    ratio = 1.0 - beta1 * (1.0 - ckp1)
    torch._foreach_lerp_(active, zs, ckp1)
    torch._foreach_add_(active, zs, alpha=-ratio)
    steps.fill_(k + 1)
    torch._fused_adam_(
        zs,
        [p.grad for p in active if p.grad is not None],  # all of them
        buffers,
        sqs,
        [],
        [steps] * len(active),
        lr=lr, beta1=0.0, beta2=beta2, weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False,
    )  # fmt: skip
    torch._foreach_add_(active, zs, alpha=ratio)
    group["k"] = k + 1


def _fused_state(
    opt: Any, active: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The fused schedule-free step's tensors for ``active``: z and the second moments (made at the
    first step: z = y), the fused kernel's first-moment buffers (made once; β₁ = 0, so each holds the
    gradient) and its step-count tensor, filled in by the caller."""
    scratch = opt.__dict__.setdefault("_fused_scratch", {})
    for p in active:
        state = opt.state[p]
        if "z" not in state:
            state["z"] = torch.clone(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if id(p) not in scratch:
            scratch[id(p)] = torch.zeros_like(p)
    steps = scratch.get(("step", active[0].device))
    if steps is None:
        steps = scratch[("step", active[0].device)] = torch.zeros((), device=active[0].device)
    return ([opt.state[p]["z"] for p in active], [scratch[id(p)] for p in active],
            [opt.state[p]["exp_avg_sq"] for p in active], steps)  # fmt: skip


_DEVICE_SCALARS = ("k", "weight_sum", "lr_max")


@torch.no_grad()
def _schedule_free_fused_on_device(
    opt: Any, group: dict[str, Any], active: list[torch.Tensor], dev: dict[str, torch.Tensor]
) -> None:
    """``_schedule_free_fused`` with the group's scalars ``dev`` (float64 device tensors), the rate
    ``opt.lr_now`` and the skip flag ``opt.found_inf`` all on the device: nothing is read back, so the
    step can be captured in a CUDA graph. A flagged step leaves z, the second moments and the scalars
    bit for bit as they were and y at the same values (its mixing weights are 0, so y·1 + z·0: a −0.0
    in y can come back +0.0; the fused kernel honours found_inf). Rounding
    differs from the host's step by the order of the products (same update, about 1e-7 relative)."""
    beta1, beta2 = group["betas"]
    keep = 1.0 - opt.found_inf.double()
    lr = opt.lr_now.double()
    lr_max = torch.where(keep > 0, torch.maximum(dev["lr_max"], lr), dev["lr_max"])
    weight = (dev["k"] + 1) ** group["r"] * lr_max ** group["weight_lr_power"]
    weight_sum = dev["weight_sum"] + weight * keep
    ckp1 = torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight_sum)) * keep
    ratio = (1.0 - beta1 * (1.0 - ckp1)) * keep  # 0 on a skipped step: y is left alone
    zs, buffers, sqs, steps = _fused_state(opt, active)
    # y ← (1 − c) y + (c − ratio) z, Adam's step on z, y ← y + ratio z (the host step's update)
    torch._foreach_mul_(active, (1.0 - ckp1).float())
    torch._foreach_add_(active, torch._foreach_mul(zs, (ckp1 - ratio).float()))
    steps.copy_(dev["k"] + 1)
    torch._fused_adam_(
        zs,
        [p.grad for p in active if p.grad is not None],
        buffers,
        sqs,
        [],
        [steps] * len(active),
        lr=opt.lr_now, beta1=0.0, beta2=beta2, weight_decay=0.0, eps=group["eps"], amsgrad=False,
        maximize=False, found_inf=opt.found_inf,
    )  # fmt: skip
    torch._foreach_add_(active, torch._foreach_mul(zs, ratio.float()))
    dev["k"].add_(keep)
    dev["weight_sum"].copy_(weight_sum)
    dev["lr_max"].copy_(lr_max)


def make_optimizer(
    cfg: Config, model: nn.Module, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The configured optimiser, its learning rate a device tensor that ``set_lr`` fills in (so a compiled
    or graph-captured step reads the schedule without being rebuilt)."""
    t = cfg.train
    device = device or next(model.parameters()).device
    lr = torch.tensor(t.lr, dtype=torch.float32, device=device)
    # the structure's groups (an autoencoder's discriminator has its own betas and weight decay)
    structure = getattr(model, "structure", None)
    params: Any = structure.param_groups(model) if structure is not None else list(model.parameters())
    betas = (float(t.betas[0]), float(t.betas[1]))
    if t.optimizer == "schedulefree":
        return _schedule_free(params, lr, t.weight_decay, betas)
    if t.optimizer in ("adam", "adamw"):
        cls = _Adam if t.optimizer == "adam" else _AdamW
        fused, capturable = runtime.adam_options(device)
        return cls(
            params, lr=lr, betas=betas, weight_decay=t.weight_decay, fused=fused, capturable=capturable
        )
    if t.optimizer == "adamax":
        return Adamax(params, lr=lr, betas=betas, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise ConfigError(f"unknown optimizer {t.optimizer!r}")


def lr_tensor(opt: torch.optim.Optimizer) -> torch.Tensor:
    lr = getattr(opt, "lr_now", None)
    if lr is None:
        lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    return lr


# ---- schedules --------------------------------------------------------------------------------------


def lr_at(cfg: Config, step: int, total_steps: int) -> float:
    """The learning rate of the 0-based global ``step`` of a run of ``total_steps`` steps."""
    t = cfg.train
    total = max(total_steps, 1)
    if t.schedule == "one-cycle":  # Smith & Topin 2018, torch's OneCycleLR defaults (cosine, 30% up)
        up = max(1, round(0.3 * total))
        start, end = t.lr / 25, t.lr / 25 / 1e4
        if step < up:
            return start + (t.lr - start) * (1 - math.cos(math.pi * step / up)) / 2
        frac = min(1.0, (step - up) / max(1, total - up))
        return end + (t.lr - end) * (1 + math.cos(math.pi * frac)) / 2
    warm = t.warmup_steps
    if warm and step < warm:
        return t.lr * (step + 1) / warm
    if t.schedule == "warmup-cosine":
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return t.lr * (t.final_lr + (1 - t.final_lr) * (1 + math.cos(math.pi * frac)) / 2)
    return t.lr


def kl_weight_at(cfg: Config, step: int, total_steps: int) -> float:
    """β of the 0-based global ``step``: linear warm-up over train.kl_warmup_steps, or cyclical
    annealing over train.kl_cycles cycles (rising over the first half of each), else train.beta."""
    t = cfg.train
    if t.kl_warmup_steps:
        return t.beta * min(1.0, step / t.kl_warmup_steps)
    if t.kl_cycles:
        period = max(1, total_steps // t.kl_cycles)
        return t.beta * min(1.0, (step % period) / (0.5 * period))
    return t.beta


# ---- the gradient guard -----------------------------------------------------------------------------

GUARD_DECAY = 0.99  # the running mean norm's memory, about the last 100 steps
GUARD_WARMUP = 20  # steps before adaptive skipping starts (the mean needs a few norms first)


class GradGuard:
    """Looks at the global gradient norm after backward, on the device: clips it (train.clip_grad),
    and decides whether the step is applied. A NaN/Inf norm always skips the step; with
    train.skip_grad = s, so does a norm above s × the running mean norm.

    The running mean learns from every finite norm, those of skipped steps clipped at the threshold,
    so a lasting change of scale raises the threshold within about a hundred steps instead of stalling
    the run (the failure of a fixed threshold, as in VDVAE). State tensors: ``mean`` (the bias-corrected
    running norm), ``seen``, and the counters the loop reads back at its log interval."""

    def __init__(self, cfg: Config, params: list[nn.Parameter], device: torch.device) -> None:
        self.params, self.clip, self.skip = params, cfg.train.clip_grad, cfg.train.skip_grad
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.state = {"ema": z(), "seen": z(), "run": z(), "max_run": z(), "nonfinite": z(), "last_norm": z()}
        self.zero = z()

    def __call__(self) -> torch.Tensor:
        """Clip, decide, update the statistics; returns ``keep`` (0-dim bool) and sets nothing else."""
        s = self.state
        norm = total_norm([p.grad for p in self.params if p.grad is not None])
        finite = torch.isfinite(norm)
        bad = ~finite
        keep = finite
        heard = norm
        if self.skip:
            corrected = s["ema"] / (1 - GUARD_DECAY ** s["seen"].clamp(min=1))
            threshold = torch.where(
                s["seen"] >= GUARD_WARMUP, self.skip * corrected, torch.full_like(norm, math.inf)
            )
            keep = finite & (norm <= threshold)
            heard = torch.minimum(norm, threshold)
        # in place, few ops (this runs every step): a non-finite norm leaves the mean where it was
        s["ema"].lerp_(torch.where(finite, heard, s["ema"]), 1 - GUARD_DECAY)
        s["seen"].add_(finite)
        s["nonfinite"].add_(bad)
        s["run"].add_(1).mul_(bad)
        torch.maximum(s["max_run"], s["run"], out=s["max_run"])
        torch.where(finite, norm, self.zero, out=s["last_norm"])
        if self.clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, s["last_norm"], foreach=True)
        return keep


def total_norm(grads: list[torch.Tensor], multi_tensor: bool | None = None) -> torch.Tensor:
    """The global L2 norm of ``grads`` (float32, 0-dim), from torch's multi-tensor norm (one norm per
    tensor, a few kernels in all) on every device: on a CPU it also beats one dot product per tensor
    (0.11-0.20 against 0.16-0.32 ms for the 10 tensors of the 784-400-20 MLP, 1.4-3.2 against 7-9 ms
    for the 301 of fmnist-hvae-gpu, whose channels-last weights a flattening copied), and it is the
    step a GPU runs, so an operator count on the CPU is the GPU's. ``multi_tensor=False``: the dot
    products (a reference for the tests). A norm above about 1.8e19, whose square overflows float32,
    comes out inf: the guard skips that step, as Adam's second moment would overflow on it anyway."""
    if not grads:
        return torch.zeros(())
    if multi_tensor is False:
        flat = [g.reshape(-1) if g.dtype in _WIDE else g.reshape(-1).float() for g in grads]
        squares = [torch.dot(g, g).float() for g in flat]
        return (squares[0] if len(squares) == 1 else torch.stack(squares).sum()).sqrt()
    norms = [n if n.dtype == torch.float32 else n.float() for n in torch._foreach_norm(grads)]
    return torch.linalg.vector_norm(torch.stack(norms))


_WIDE = (torch.float32, torch.float64)


# ---- weight averaging -------------------------------------------------------------------------------


@contextlib.contextmanager
def _weights_in(params: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[None]:
    """``values`` in ``params`` for the duration; the parameters' own bits restored afterwards."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, values)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


class EMA:
    """An exponential moving average of a model's parameters, updated on the device after every step:
    ema ← d·ema + (1 − d)·θ, with d = min(decay, (1 + t)/(10 + t)) after t updates. The warm-up of d
    keeps a short run's average from still holding the initial weights (with d = 0.999, 37% of them
    after 1,000 steps)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.model_params: list[torch.Tensor] = list(model.parameters())
        self.params = [p.detach().clone() for p in self.model_params]
        self.updates = torch.zeros((), device=self.params[0].device)

    @torch.no_grad()
    def update(self) -> None:
        d = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)
        torch._foreach_mul_(self.params, d)
        # (no detach per tensor: under no_grad the parameters themselves are read without a graph)
        torch._foreach_add_(self.params, torch._foreach_mul(self.model_params, 1 - d))
        self.updates.add_(1)

    def state(self) -> dict[str, torch.Tensor]:
        """``{"ema.<parameter name>": tensor}`` and ``ema_updates``, as checkpoints store them."""
        named = {f"ema.{name}": p for name, p in zip(self.names, self.params, strict=True)}
        return {**named, "ema_updates": self.updates}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in zip(self.names, self.params, strict=True):
            if f"ema.{name}" in tensors:
                p.copy_(tensors[f"ema.{name}"])
        if "ema_updates" in tensors:
            self.updates.copy_(tensors["ema_updates"])

    def held(self) -> list[torch.Tensor]:
        """The tensors a snapshot of the training state must copy."""
        return [*self.params, self.updates]

    def swapped(self) -> contextlib.AbstractContextManager[None]:
        """The averaged weights in the model for the duration (evaluation, pictures, the best model)."""
        return _weights_in(self.model_params, self.params)


class ScheduleFreeAverage:
    """The weights a schedule-free run evaluates, with EMA's interface: the parameters hold the training
    point y, the optimiser's state the base sequence z, and the average x = y + (1 − 1/β₁)(z − y) is
    what evaluation, pictures and the saved model use (schedulefree's ``eval()``, computed without
    changing the optimiser's mode, so training resumes from the same bits)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.model_params: list[torch.Tensor] = list(model.parameters())
        self.opt = opt

    def update(self) -> None:  # the optimiser's step keeps z; nothing to average here
        pass

    @torch.no_grad()
    def average(self) -> list[torch.Tensor]:
        """x for each parameter (y itself before the first step)."""
        beta1 = self.opt.param_groups[0]["betas"][0]
        out = []
        for p in self.model_params:
            z = self.opt.state[p].get("z")
            out.append(p.detach().clone() if z is None else torch.lerp(p.detach(), z, 1 - 1 / beta1))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """``{"ema.<parameter name>": x}``: the model a checkpoint's readers (encode, sample, export) load."""
        return {f"ema.{name}": x for name, x in zip(self.names, self.average(), strict=True)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:  # x follows from y and z, both restored
        pass

    def held(self) -> list[torch.Tensor]:
        return []

    def swapped(self) -> contextlib.AbstractContextManager[None]:
        """x in the model for the duration; y restored exactly afterwards."""
        return _weights_in(self.model_params, self.average())


Average = EMA | ScheduleFreeAverage  # the weights a run evaluates, when they are not its parameters


def weight_average(cfg: Config, model: nn.Module, opt: torch.optim.Optimizer) -> Average | None:
    """The weights the run evaluates and saves, when they are not the parameters: train.ema's average, or
    a schedule-free optimiser's x."""
    if cfg.train.optimizer == "schedulefree":
        return ScheduleFreeAverage(model, opt)
    return EMA(model, cfg.train.ema) if cfg.train.ema else None
