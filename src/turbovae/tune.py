"""``turbovae tune``: measure this machine and this problem, then recommend a training config.

The pieces, each usable on its own:

- :class:`NoiseScale`: the simple gradient-noise scale B_simple = tr(Σ)/|G|² of McCandlish et al. (2018),
  estimated from squared gradient norms at two batch sizes. It approximates the *critical batch*: below
  it, doubling the batch nearly halves the steps to a given loss; above it, extra examples per step are
  mostly wasted. Pure arithmetic on floats or 0-dim tensors (no host sync until ``value`` is read).
- :func:`throughput_sweep`: samples/s and peak memory per batch size on the current device, up to the
  largest batch that fits (CUDA: until out of memory; CPU: until memory, time or throughput say stop).
- :func:`lr_range_test` and :func:`suggest_lr`: Smith's (2017) learning-rate range test.
- :func:`scale_lr` and :func:`warmup_steps_for`: what to do to the learning rate when the batch changes.
- :func:`choose_batch`: the batch with the least predicted time to a given loss, (B + B_noise) / T(B).
- :func:`tune`: all of it within a time budget; :func:`search`: an Optuna search (``turbovae[search]``).

This module imports neither optuna nor the training loop at import time: ``turbovae.train`` may import
:class:`NoiseScale` from here for its in-training logging.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config
    from .train import Setup

Number = float | torch.Tensor  # a Python float or a 0-dim tensor (kept on its device)


# ---- the gradient-noise scale --------------------------------------------------------------------------


class NoiseScale:
    """The simple gradient-noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model
    of Large-Batch Training", section 2.2 and appendix A).

    G is the true gradient and Σ the covariance of the per-example gradients. A batch gradient g_B (the mean
    of B per-example gradients) has E|g_B|² = |G|² + tr(Σ)/B, so squared norms measured at two batch sizes
    B_small < B_big give unbiased estimates of both terms:

        |G|²  ≈ (B_big·|g_big|² − B_small·|g_small|²) / (B_big − B_small)
        tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

    Each single estimate is very noisy (|G|² can come out negative), so, as in the paper's appendix A, the
    numerator and the denominator are smoothed separately with an exponential moving average and divided
    only when ``value`` is read. On one device, g_small can be the gradient of one chunk of a batch and
    g_big the mean over its chunks; averaging |g_small|² over the chunks lowers the variance.

    ``update`` takes floats or 0-dim tensors and never reads a tensor back to the host; ``value`` does.

    Args:
        decay: the moving average's decay per update, in [0, 1); 0 keeps only the last update.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self._g2: Number = 0.0  # moving averages, not yet divided by the bias correction _weight
        self._trace: Number = 0.0
        self._weight = 0.0  # 1 − decay^updates: the zero start's bias, which cancels in the ratio

    def update(self, g2_small: Number, b_small: float, g2_big: Number, b_big: float) -> None:
        """Add one measurement: squared gradient norms ``g2_small`` at batch ``b_small`` and ``g2_big`` at
        batch ``b_big`` (for the mean loss over the batch, at about the same parameters)."""
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
        trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
        d = self.decay
        self._g2 = d * self._g2 + (1.0 - d) * g2
        self._trace = d * self._trace + (1.0 - d) * trace
        self._weight = d * self._weight + (1.0 - d)
        self.updates += 1

    @property
    def g2(self) -> float | None:
        """The smoothed estimate of |G|², the squared norm of the true gradient (None before any update)."""
        return float(self._g2) / self._weight if self.updates else None

    @property
    def trace(self) -> float | None:
        """The smoothed estimate of tr(Σ), the per-example gradient variance (None before any update)."""
        return float(self._trace) / self._weight if self.updates else None

    @property
    def value(self) -> float | None:
        """B_simple = tr(Σ)/|G|², in examples; None before any update, ``inf`` while the smoothed |G|² is not
        positive (the noise swamps the signal: no batch is too large yet)."""
        if not self.updates:
            return None
        g2, trace = float(self._g2), float(self._trace)
        if not g2 > 0:
            return math.inf
        return max(trace, 0.0) / g2

    def state_dict(self) -> dict[str, float]:
        """Plain floats, for a checkpoint's JSON (reads tensors back to the host)."""
        return {"decay": self.decay, "updates": self.updates, "g2": float(self._g2),
                "trace": float(self._trace), "weight": self._weight}  # fmt: skip

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self._g2, self._trace, self._weight = (
            float(state["g2"]),
            float(state["trace"]),
            float(state["weight"]),
        )


def squared_norm(
    tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Σ |t|² over ``tensors`` (gradients), or Σ w·t² with per-element ``weights`` (a diagonal metric), as a
    0-dim fp32 tensor on their device: no host sync."""
    if not tensors:
        return torch.zeros(())
    if weights is None:
        return torch.stack([t.float().pow(2).sum() for t in tensors]).sum()
    return torch.stack([(w * t.float().pow(2)).sum() for t, w in zip(tensors, weights, strict=True)]).sum()


def adam_preconditioner(
    opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """Adam's diagonal preconditioner P = 1/(√v̂ + ε) per parameter (Adamax: 1/(u + ε)) from the optimiser's
    state, or None before its first step and for optimisers without one (SGD).

    Measured with ``squared_norm(g, P)``, the noise scale is B_simple of the problem in the coordinates where
    Adam's update is a plain gradient step. B_simple equals the true noise scale when the Hessian is a
    multiple of the identity (McCandlish et al. 2018, section 2.2); the preconditioner brings it closer to
    that, and on Fashion-MNIST the preconditioned value (about 100 after a few epochs) predicted the examples
    larger batches needed better than the plain one (about 35)."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    weights = []
    for p in params:
        state, group = opt.state.get(p), group_of.get(id(p))
        if not state or group is None or "step" not in state:
            return None
        if "exp_avg_sq" in state:
            beta2 = group["betas"][1]
            v_hat = state["exp_avg_sq"].float() / (1 - beta2 ** float(state["step"]))
            weights.append(1.0 / (v_hat.sqrt() + group["eps"]))
        elif "exp_inf" in state:
            weights.append(1.0 / (state["exp_inf"].float() + group["eps"]))
        else:
            return None
    return weights


# ---- learning-rate rules -------------------------------------------------------------------------------


def scale_lr(lr: float, from_batch: int, to_batch: int, optimizer: str) -> float:
    """The learning rate for ``to_batch`` given one that works at ``from_batch``: linear in the batch for
    SGD (Goyal et al. 2017), square-root for the Adam family (Adam's update is normalised by the gradient's
    second moment, so its noise, not its size, scales with the batch: Malladi et al. 2022). Either way a
    larger learning rate wants a warm-up (:func:`warmup_steps_for`)."""
    if from_batch < 1 or to_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got {from_batch} and {to_batch}")
    ratio = to_batch / from_batch
    return lr * (ratio if optimizer == "sgd" else math.sqrt(ratio))


def warmup_steps_for(total_steps: int, fraction: float = 0.05) -> int:
    """Linear warm-up over ``fraction`` of the run (5%: Goyal et al. warm up 5 of 90 epochs), at least one
    step, at most a tenth of the run."""
    return max(1, min(round(fraction * total_steps), total_steps // 10 or 1))


def smooth(losses: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the range test's smoothed loss)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], divisor: float = 4.0) -> dict[str, float]:
    """The range test's rule: ``lr_min / divisor``, where ``lr_min`` is the learning rate at which the
    smoothed loss is lowest. Also returned: ``lr_steep``, where the smoothed loss falls fastest per decade of
    learning rate before the minimum (reported, not used: in a few hundred steps from a fresh model the
    steepest fall is where the untrained model first moves, about 5e-4 for Adam whatever the batch).

    Why a quarter: the minimum is the edge of stability (a little more and the loss blows up) and the
    smoothing lags about 10 steps, which puts the measured minimum some 1.5× past the true one; Smith's
    (and fastai's) tenth is for a constant rate, while the warm-up + cosine schedule tune recommends spends
    most of its steps well below its peak. On Fashion-MNIST (784-400-20, Adam) the minimum was at 8e-3 to
    1e-2 for batches 128 to 2048; 2e-3 with warm-up + cosine at batch 128 beat 1e-3 (10 epochs, test
    NELBO 243.8 against 244.3 for the constant 1e-3)."""
    if len(lrs) != len(smoothed) or len(lrs) < 5:
        raise ValueError(f"need at least 5 (lr, loss) pairs of equal length, got {len(lrs)}, {len(smoothed)}")
    i_min = min(range(len(smoothed)), key=lambda i: smoothed[i])
    # slope per decade by central differences in log10(lr), over the part before the minimum
    slopes = [
        ((smoothed[i + 1] - smoothed[i - 1]) / math.log10(lrs[i + 1] / lrs[i - 1]), i)
        for i in range(1, min(i_min, len(lrs) - 1))
    ]
    lr_steep = lrs[min(slopes)[1]] if slopes else lrs[i_min]
    return {"lr": lrs[i_min] / divisor, "lr_min": lrs[i_min], "lr_steep": lr_steep}


def lr_range_test(
    step: Callable[[float], float],
    lr_lo: float,
    lr_hi: float,
    steps: int,
    *,
    deadline: float | None = None,
    beta: float = 0.9,
    diverge: float = 4.0,
) -> dict[str, Any]:
    """Smith's (2017) range test: ``steps`` training steps from a fresh model with the learning rate rising
    exponentially from ``lr_lo`` to ``lr_hi``; ``step(lr)`` runs one step and returns its loss.

    Stops early when the loss is not finite, when the smoothed loss exceeds ``diverge`` times its best so
    far (positive losses) or the best plus ``diverge`` times the best's magnitude otherwise, or at
    ``deadline`` (``time.perf_counter()``). Returns the curve and :func:`suggest_lr`'s choice (``lr`` is
    None when fewer than 5 steps ran)."""
    if not 0 < lr_lo < lr_hi or steps < 2:
        raise ValueError(f"need 0 < lr_lo < lr_hi and steps >= 2, got {lr_lo}, {lr_hi}, {steps}")
    lrs: list[float] = []
    losses: list[float] = []
    avg, best, stop = 0.0, math.inf, "end of range"
    for i in range(steps):
        lr = lr_lo * (lr_hi / lr_lo) ** (i / (steps - 1))
        loss = step(lr)
        if not math.isfinite(loss):
            stop = f"loss {loss} at lr {lr:.3g}"
            break
        lrs.append(lr)
        losses.append(loss)
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta ** (i + 1))
        best = min(best, smoothed)
        limit = diverge * best if best > 0 else best + diverge * abs(best) + 1e-12
        if smoothed > limit and i > 0:
            stop = f"smoothed loss above {diverge:g}× its best at lr {lr:.3g}"
            break
        if deadline is not None and time.perf_counter() > deadline:
            stop = f"time budget, at lr {lr:.3g}"
            break
    curve = smooth(losses, beta)
    result: dict[str, Any] = {
        "lrs": lrs,
        "losses": losses,
        "smoothed": curve,
        "stopped": stop,
        "steps": len(lrs),
    }
    result.update(suggest_lr(lrs, curve) if len(lrs) >= 5 else {"lr": None, "lr_min": None, "lr_steep": None})
    return result


def choose_batch(samples_per_second: dict[int, float], noise_scale: float | None) -> tuple[int, str]:
    """The batch size with the least predicted time to a given loss, and why.

    McCandlish et al. (2018, eq. 2.11): reaching a given loss takes S = S_min·(1 + B_noise/B) steps, i.e.
    E = E_min·(1 + B/B_noise) examples; at T(B) samples/s that is E/T(B) ∝ (B + B_noise)/T(B) seconds. A
    batch far above B_noise wins only where throughput grows almost linearly with it (nearly free)."""
    if not samples_per_second:
        raise ValueError("no throughput measurements")
    if noise_scale is None:
        best = max(samples_per_second, key=lambda b: samples_per_second[b])
        return (
            best,
            f"the highest throughput measured ({samples_per_second[best]:,.0f} samples/s; no noise scale)",
        )
    if math.isinf(noise_scale):
        best = max(samples_per_second, key=lambda b: samples_per_second[b])
        return (
            best,
            "the highest throughput measured (the gradient noise swamps its mean: B_noise ≫ any batch)",
        )
    cost = {b: (b + noise_scale) / t for b, t in samples_per_second.items()}
    best = min(cost, key=lambda b: cost[b])
    fastest = max(samples_per_second, key=lambda b: samples_per_second[b])
    why = (
        f"least predicted time to a given loss, (B + B_noise)/throughput with B_noise ≈ {noise_scale:,.0f} "
        f"and {samples_per_second[best]:,.0f} samples/s"
    )
    if fastest != best:
        why += (
            f"; batch {fastest} runs {samples_per_second[fastest] / samples_per_second[best]:.2f}× the "
            f"samples/s but needs {(1 + fastest / noise_scale) / (1 + best / noise_scale):.2f}× the examples"
        )
    return best, why


# ---- measurements on the configured model --------------------------------------------------------------


def fresh_vae(s: Setup, cfg: Config, seed: int) -> Any:
    """A newly initialised VAE for ``cfg`` on the set-up's device, laid out as ``train.setup`` lays it."""
    from .train import build_vae

    torch.manual_seed(seed)
    vae = build_vae(cfg, s.data.event_shape, s.data.meta).to(s.device)
    if cfg.model.name == "conv" and s.device.type == "cuda":
        vae = vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # as setup does
    return vae


class _Runner:
    """A fresh model and optimiser, stepped at a learning rate chosen per step: tune's own short runs
    (throughput is timed by turbovae.bench with the step `turbovae train` runs)."""

    def __init__(self, s: Setup, cfg: Config, seed: int, x_train: torch.Tensor | None = None) -> None:
        from . import runtime
        from .data.batches import preparer
        from .objectives import noise_shape_of
        from .optim import make_optimizer
        from .train import Task

        self.s, self.cfg, self.device = s, cfg, s.device
        self.vae = fresh_vae(s, cfg, seed)
        self.vae.train()
        self.opt = make_optimizer(cfg, self.vae, s.device)
        self.params = [p for p in self.vae.parameters() if p.requires_grad]
        self.task = Task(self.vae, cfg)  # the objective as `turbovae train` calls it
        # the VAE's latent width: a hierarchical net's is all its groups, not model.latent
        self.noise_shape = functools.partial(noise_shape_of, cfg.train.objective, latent=self.vae.latent,
                                             k=cfg.train.iwae_k)  # fmt: skip
        self.gen_data = runtime.generator(s.device, seed)
        self.gen_noise = runtime.generator(s.device, seed + 1)
        self.prepare = preparer(s.train_max, s.binarize_mode == "dynamic", self.gen_data)
        self.x = s.x_train if x_train is None else x_train
        self.perm = torch.randperm(len(self.x), generator=self.gen_data, device=s.device)
        self.position = 0
        self.scaler = torch.amp.GradScaler(s.device.type) if s.precision == "fp16" else None
        self.steps = 0

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``size`` examples of a shuffled pass (reshuffled as it runs out), prepared, and noise."""
        if self.position + size > len(self.perm):
            self.perm = torch.randperm(len(self.x), generator=self.gen_data, device=self.device)
            self.position = 0
        x = self.prepare(self.x[self.perm[self.position : self.position + size]])
        self.position += size
        eps = torch.randn(self.noise_shape(len(x)), generator=self.gen_noise, device=self.device)
        return x, eps

    def loss(self, x: torch.Tensor, eps: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        from . import runtime

        with runtime.autocast(self.device, self.s.precision):
            return self.task(x, eps, beta)["loss"]  # beta None: train.beta

    def step(self, size: int, lr: float, beta: float | None = None) -> torch.Tensor:
        """One optimisation step at learning rate ``lr``; the loss, detached, still on the device."""
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # optim.make_optimizer's lr is a device tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        x, eps = self.batch(size)
        loss = self.loss(x, eps, beta)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.steps += 1
        return loss.detach()

    def noise_probe(self, b_small: int, chunks: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{metric: (mean of |g_small|² over ``chunks`` batches of ``b_small``, |g_big|² of their union)}: the
        gradient of each chunk's mean loss, and their mean, which is the gradient of the big batch's mean
        loss. Metrics: "euclidean" always, "adam" once an Adam-family optimiser has its second moments (see
        :func:`adam_preconditioner`)."""
        metrics: dict[str, list[torch.Tensor] | None] = {"euclidean": None}
        adam = adam_preconditioner(self.opt, self.params)
        if adam is not None:
            metrics["adam"] = adam
        total = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        small = {name: torch.zeros((), device=self.device) for name in metrics}
        for _ in range(chunks):
            x, eps = self.batch(b_small)
            self.opt.zero_grad(set_to_none=True)
            self.loss(x, eps).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            with torch.no_grad():
                for acc, g in zip(total, grads, strict=True):
                    acc.add_(g)
                for name, weights in metrics.items():
                    small[name] += squared_norm(grads, weights)
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            mean = [acc / chunks for acc in total]
            return {name: (small[name] / chunks, squared_norm(mean, w)) for name, w in metrics.items()}


def _with(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` with ``section_key=value`` changes (``train_batch_size=512``), not validated."""
    out = copy.deepcopy(cfg)
    for name, value in changes.items():
        section, key = name.split("_", 1)
        setattr(getattr(out, section), key, value)
    return out


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def candidate_batches(base: int, n_train: int, smallest: int = 32, max_steps_fraction: int = 8) -> list[int]:
    """Powers of two from ``smallest`` (or less, for tiny data) up to n_train/8 (at least 8 steps an
    epoch), plus the configured batch ``base``."""
    top = max(1, n_train // max_steps_fraction)
    sizes, b = set(), min(smallest, top)
    while b <= top:
        sizes.add(b)
        b *= 2
    if base <= n_train:
        sizes.add(base)
    return sorted(sizes)


def throughput_sweep(
    s: Setup,
    batches: Sequence[int],
    *,
    deadline: float | None = None,
    windows: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Samples/s and peak memory of the training step ``turbovae train`` runs (eager: compiling is judged
    separately), per batch size in increasing order, with turbovae.bench.bench_turbovae.

    Stops at the first batch that does not fit: on CUDA at an out-of-memory error; on the CPU when the
    next batch would need more than half the memory still available (peak RSS grows with the batch), when
    throughput falls below 70% of the best so far (the step's time explodes), or when the next batch is
    predicted (its warm-up and windows at the last step time, scaled by the batch) to overrun
    ``deadline``. Peak memory is the device's peak on CUDA and the process's peak resident set size on the
    CPU."""
    from . import runtime
    from .bench import bench_turbovae

    points: list[dict[str, Any]] = []
    stopped, last_rss = "all sizes measured", None
    steps = 5
    warmup_steps = getattr(runtime, "PROBE_STEPS", 20) + 11  # bench_turbovae's warm-up and its counted step
    for batch in batches:
        now = time.perf_counter()
        if points and deadline is not None:
            predicted = (warmup_steps + windows * steps) * points[-1]["step_ms"] / 1e3
            predicted *= batch / points[-1]["batch_size"]
            if now + predicted > deadline:
                stopped = f"time budget (batch {batch} would take about {predicted:.1f} s)"
                break
        if s.device.type == "cpu" and points and last_rss is not None:
            grow = max(points[-1]["peak_memory_bytes"] - last_rss, 0)
            available = _available_memory()
            if available is not None and 2 * grow > available / 2:
                stopped = f"memory (batch {batch} would need about {2 * grow / 2**30:.1f} GiB more)"
                break
        cfg = _with(s.cfg, train_batch_size=batch, train_compile="off")
        vae = fresh_vae(s, cfg, cfg.train.seed)
        point_setup = dataclasses.replace(s, cfg=cfg, vae=vae)
        last_rss = points[-1]["peak_memory_bytes"] if points else None
        try:
            result = bench_turbovae(point_setup, windows, steps)
        except torch.cuda.OutOfMemoryError:
            del vae, point_setup
            torch.cuda.empty_cache()
            stopped = f"out of memory at batch {batch}"
            break
        point = {"batch_size": batch, "samples_per_second": result["samples_per_second"],
                 "step_ms": result["step_ms"], "peak_memory_bytes": result["peak_memory_bytes"]}  # fmt: skip
        points.append(point)
        log(f"batch {batch:>6}: {point['samples_per_second']:>11,.0f} samples/s, "
            f"{point['step_ms']:.2f} ms/step, peak memory {point['peak_memory_bytes'] / 2**20:,.0f} "
            "MiB")  # fmt: skip
        # about 0.1 s per window at the next (twice as large) batch, 3 to 20 steps
        steps = int(min(20, max(3, 0.1 / max(2 * result["step_ms"] / 1e3, 1e-6))))
        point["seconds"] = round(time.perf_counter() - now, 2)
        best = max(p["samples_per_second"] for p in points)
        if s.device.type == "cpu" and point["samples_per_second"] < 0.7 * best:
            stopped = (
                f"throughput fell to {point['samples_per_second'] / best:.0%} of the best at batch {batch}"
            )
            break
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    largest = points[-1]["batch_size"] if points else None
    return {"points": points, "stopped": stopped, "largest_batch": largest,
            "memory": "device peak" if s.device.type == "cuda" else "process peak RSS"}  # fmt: skip


def measure_noise_scale(
    s: Setup,
    cfg: Config,
    *,
    deadline: float,
    b_small: int,
    chunks: int = 16,
    probe_every: int = 25,
    decay: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a fresh model with ``cfg`` (its batch and learning rate) until ``deadline``, probing the
    gradient-noise scale every ``probe_every`` steps with ``chunks`` batches of ``b_small`` (B_big =
    chunks·b_small), as plain B_simple and in Adam's metric for the Adam family
    (:func:`adam_preconditioner`).

    Returns ``value`` (B_simple in Adam's metric for the Adam family, else the plain one; None if the run
    diverged), ``euclidean`` and ``adam`` (both, where measured) and the probes' history of ``value``.
    The noise scale changes as training goes on; the moving average favours the last probes, so the
    longer the budget, the later in training the estimate."""
    runner = _Runner(s, cfg, seed)
    scales: dict[str, NoiseScale] = {}
    history: list[tuple[int, float | None]] = []
    b_big = b_small * chunks
    last = torch.zeros((), device=s.device)
    main = "euclidean"
    while not scales or scales[main].updates < 2 or time.perf_counter() < deadline:
        late = time.perf_counter() >= deadline  # past it with fewer than 2 probes: probe at once
        if not late or runner.steps == 0:
            last = runner.step(cfg.train.batch_size, cfg.train.lr)
        if late or runner.steps % probe_every == 0:  # after the first steps: Adam's metric exists by then
            for name, (g2_small, g2_big) in runner.noise_probe(b_small, chunks).items():
                scales.setdefault(name, NoiseScale(decay)).update(g2_small, b_small, g2_big, b_big)
            main = "adam" if "adam" in scales else "euclidean"
            value = scales[main].value
            history.append((runner.steps, None if value is None or math.isinf(value) else round(value, 1)))
    loss = float(last)
    out: dict[str, Any] = {"value": None, "metric": main, "steps": runner.steps, "loss": loss,
                           "epochs": runner.steps * cfg.train.batch_size / len(s.x_train),
                           "probes": scales[main].updates, "b_small": b_small, "b_big": b_big}  # fmt: skip
    if math.isfinite(loss):
        out.update({name: scale.value for name, scale in scales.items()})
        out["value"] = out[main]
        out["history"] = history
    return out


def time_steps(s: Setup, cfg: Config, batch: int, steps: int = 8, warmup: int = 3) -> float:
    """Seconds per training step of a fresh model at ``batch`` (tune's eager step, after ``warmup``
    steps): a quick comparison of settings that change the speed of every step alike, such as threads."""
    from . import runtime

    runner = _Runner(s, cfg, cfg.train.seed)
    for _ in range(warmup):
        runner.step(batch, cfg.train.lr)
    runtime.synchronize(s.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = runner.step(batch, cfg.train.lr)
    float(last)  # waits for the device
    return (time.perf_counter() - t0) / steps


def run_range_test(s: Setup, cfg: Config, batch: int, steps: int, deadline: float | None = None,
                   seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """:func:`lr_range_test` on a fresh model with ``cfg`` at ``batch``: from 1e-5 to 1 for the Adam family,
    1e-4 to 10 for SGD."""
    runner = _Runner(s, cfg, seed)
    lo, hi = (1e-4, 10.0) if cfg.train.optimizer == "sgd" else (1e-5, 1.0)
    return lr_range_test(lambda lr: float(runner.step(batch, lr)), lo, hi, steps, deadline=deadline)


# ---- the recommendation --------------------------------------------------------------------------------


@dataclasses.dataclass
class Recommendation:
    """What :func:`tune` recommends: the full config, one reason per choice, and what was measured."""

    config: Config
    reasons: dict[str, str]  # config key -> one line
    measured: dict[str, Any]
    seconds: float = 0.0

    def choices(self) -> dict[str, Any]:
        out = {}
        for key in self.reasons:
            section, name = key.split(".")
            out[key] = getattr(getattr(self.config, section), name)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"choices": self.choices(), "reasons": self.reasons, "measured": self.measured,
                "seconds": round(self.seconds, 2)}  # fmt: skip

    def header(self, title: str) -> str:
        lines = [f"# {title}"]
        lines += [f"#   {key} = {_show(value)}: {self.reasons[key]}" for key, value in self.choices().items()]
        return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class _Clock:
    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + budget

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())

    def share(self, fraction: float) -> float:
        """A deadline ``fraction`` of the time left from now."""
        return time.perf_counter() + fraction * self.left()


def _compile_choice(device_type: str, steps: int, step_s: float) -> tuple[str, str]:
    """Compile only when the run is long enough to repay it, with the numbers runtime.StepCompiler uses."""
    from . import runtime

    cost, speedup = getattr(runtime, "_COMPILE_DEFAULTS", {}).get(device_type, (30.0, 1.3))
    saving = steps * step_s * (1 - 1 / max(speedup, 1.0))
    if saving > 1.2 * cost:
        return "auto", (
            f"{steps:,} steps at {step_s * 1e3:.2f} ms should save about {saving:.0f} s against a compile "
            f"of about {cost:.0f} s; `auto` compiles after timing its first steps"
        )
    return "off", (
        f"{steps:,} steps at {step_s * 1e3:.2f} ms would save about {saving:.1f} s, less than a compile "
        f"costs (about {cost:.0f} s with a cold cache)"
    )


def tune(
    cfg: Config,
    *,
    budget: float = 60.0,
    train_budget: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Recommendation:
    """Measure throughput per batch size, the gradient-noise scale and an LR range test within ``budget``
    seconds, then recommend batch size, learning rate, schedule, precision, compile and epochs.

    Epochs: with ``train_budget`` (seconds for the whole `turbovae train` process), as many as fit in it
    at the measured throughput, after start-up and final evaluation; without it, the configured epochs
    scaled so the run sees as many examples as it needs at the new batch to reach the loss the configured
    run would (E ∝ 1 + B/B_noise, McCandlish et al. 2018)."""
    from . import runtime
    from .config import resolve
    from .train import setup

    if budget <= 0:
        raise ConfigError(f"--budget must be > 0 seconds, got {budget}")
    if train_budget is not None and train_budget <= 0:
        raise ConfigError(f"--train-budget must be > 0 seconds, got {train_budget}")
    clock = _Clock(budget)
    started_after = runtime.process_seconds()
    runtime.seed_everything(cfg.train.seed)
    s = setup(cfg)
    runtime.configure(s.device, cfg.train.threads)
    setup_s = time.perf_counter() - clock.start
    n_train = len(s.x_train)
    measured: dict[str, Any] = {"device": runtime.describe(s.device), "data": s.data.name, "n_train": n_train,
                                "setup_seconds": round(setup_s, 2)}  # fmt: skip
    reasons: dict[str, str] = {}
    base_batch, base_lr, optimizer = cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer
    log(f"{s.data.name}, {cfg.model.name}, {runtime.describe(s.device)}, precision {s.precision}; "
        f"budget {budget:.0f} s")  # fmt: skip

    # 0. CPU threads: torch's default against one, back to back (on cores busy with other work, more threads
    # than free cores collapse: a step can take 10-50× as long), at the configured batch
    threads = cfg.train.threads
    if s.device.type == "cpu" and threads == 0 and torch.get_num_threads() > 1:
        default = torch.get_num_threads()
        many = time_steps(s, cfg, base_batch)
        torch.set_num_threads(1)
        one = time_steps(s, cfg, base_batch)
        measured["threads_step_seconds"] = {str(default): many, "1": one}
        log(f"batch {base_batch:>6}: {1e3 * many:.2f} ms/step with {default} threads, {1e3 * one:.2f} with 1")
        if one < many / 1.1:
            threads = 1
            reasons["train.threads"] = (
                f"1 thread ran {many / one:.1f}× as fast as {default} (other work shares the cores; measure "
                "again on an idle machine)"
            )
        else:
            torch.set_num_threads(default)
            reasons["train.threads"] = (
                f"torch's default ({default}) ran {one / many:.2f}× as fast as 1 thread"
            )

    measured["device"] = runtime.describe(s.device)

    # 1. throughput per batch size (eager), up to the largest batch that fits
    sweep = throughput_sweep(s, candidate_batches(base_batch, n_train), deadline=clock.share(0.35), log=log)
    measured["throughput"] = sweep
    speed = {p["batch_size"]: p["samples_per_second"] for p in sweep["points"]}
    if not speed:
        raise ConfigError(f"tune could not time one training step within --budget {budget:g} s; raise it")

    # 2. the gradient-noise scale, from a short run with the configured batch and learning rate
    b_small = min(64, max(1, base_batch // 2), n_train // 32 or 1)
    chunks = max(2, min(16, n_train // (4 * b_small)))
    noise = measure_noise_scale(s, cfg, deadline=clock.share(0.45), b_small=b_small, chunks=chunks)
    measured["noise_scale"] = noise
    b_noise = noise["value"]
    if b_noise is not None:
        plain = f" ({noise['euclidean']:,.0f} plain)" if noise["metric"] == "adam" else ""
        log(f"gradient-noise scale B_simple ≈ {b_noise:,.0f} examples in the {noise['metric']} metric"
            f"{plain}, after {noise['steps']} steps ({noise['epochs']:.2f} epochs; {noise['probes']} probes, "
            f"batch {b_small} against {noise['b_big']})")  # fmt: skip

    # 3. the batch: least predicted time to a given loss
    batch, why = choose_batch(speed, b_noise)
    reasons["train.batch_size"] = why

    # 4. precision: bf16 where it is measured faster (likelihood sums and the KL stay fp32 either way)
    precision = s.precision
    check_s = 2 * (getattr(runtime, "PROBE_STEPS", 20) + 11 + 3 * 20) * batch / speed[batch]  # two points
    if cfg.train.precision == "auto" and s.precision in ("bf16", "fp16") and check_s < 0.5 * clock.left():
        # both again, back to back: on a shared machine, numbers taken a minute apart do not compare
        reduced = throughput_sweep(s, [batch], deadline=clock.share(0.15))["points"]
        fp32 = throughput_sweep(dataclasses.replace(s, precision="fp32"), [batch], deadline=clock.share(0.3))
        if reduced and fp32["points"]:
            fast, slow = reduced[0]["samples_per_second"], fp32["points"][0]["samples_per_second"]
            ratio = fast / slow
            measured["precision_samples_per_second"] = {s.precision: fast, "fp32": slow}
            log(f"batch {batch:>6}: {fast:>11,.0f} samples/s in {s.precision}, {slow:,.0f} in fp32")
            speed[batch] = fast
            if ratio < 1.05:
                precision = "fp32"
                speed[batch] = slow
                why = f"{s.precision} ran only {ratio:.2f}× the fp32 samples/s at batch {batch}"
            else:
                why = f"{ratio:.2f}× the fp32 samples/s at batch {batch}; likelihood sums and KL stay fp32"
            reasons["train.precision"] = why
    if "train.precision" not in reasons:
        reasons["train.precision"] = (
            f"kept as configured ({cfg.train.precision})"
            if cfg.train.precision != "auto"
            else f"{'no native bf16 here' if precision == 'fp32' else 'native here; not timed against fp32'}"
        )
    s = dataclasses.replace(s, precision=precision)

    # 5. the learning rate at that batch: the range test, else the scaling rule
    scaled = scale_lr(base_lr, base_batch, batch, optimizer)
    rule = "linear" if optimizer == "sgd" else "square-root"
    step_s = batch / speed[batch]
    range_steps = int(min(300, clock.left() * 0.8 / (1.5 * step_s)))
    lr_test: dict[str, Any] | None = None
    if range_steps >= 60:
        lr_test = run_range_test(s, cfg, batch, range_steps, deadline=clock.share(0.9))
        measured["lr_range_test"] = {k: lr_test[k] for k in ("lr", "lr_min", "lr_steep", "stopped", "steps")}
        log(f"LR range test at batch {batch}: {lr_test['steps']} steps, smoothed loss lowest at lr "
            f"{_show(lr_test['lr_min'])}; stopped: {lr_test['stopped']}")  # fmt: skip
    if lr_test is not None and lr_test["lr"] is not None:
        lr = lr_test["lr"]
        reasons["train.lr"] = (
            f"a quarter of {_show(lr_test['lr_min'])}, where the LR range test's smoothed loss bottomed out "
            f"at batch {batch} ({rule} scaling of {_show(base_lr)} at batch {base_batch}: {_show(scaled)})"
        )
    else:
        lr = scaled
        reasons["train.lr"] = (
            f"{rule} scaling of {_show(base_lr)} from batch {base_batch} (no time for an LR test)"
        )

    # 6. epochs: fit the training budget, or match the configured run's quality at the new batch
    steps_per_epoch = max(1, n_train // batch)
    epoch_s = steps_per_epoch * step_s
    if train_budget is not None:
        start_s = started_after + setup_s  # imports and data, as measured in this process
        per_epoch_eval = epoch_s * 0.2 * len(s.x_test) / n_train if cfg.eval.every_epoch else 0.0
        final_eval = epoch_s * len(s.x_test) / n_train * (0.5 + 0.3 * cfg.eval.iwae_k) + 1.0
        epochs = max(1, int((train_budget - start_s - final_eval) / (epoch_s + per_epoch_eval)))
        reasons["train.epochs"] = (
            f"fit --train-budget {train_budget:g} s: {epoch_s:.2f} s per epoch at {speed[batch]:,.0f} "
            f"samples/s, after about {start_s + final_eval:.1f} s of start-up and final evaluation"
        )
    elif b_noise is not None and math.isfinite(b_noise) and batch != base_batch:
        factor = (1 + batch / b_noise) / (1 + base_batch / b_noise)
        epochs = max(1, math.ceil(cfg.train.epochs * factor))
        reasons["train.epochs"] = (
            f"{cfg.train.epochs} epochs at batch {base_batch} × {factor:.2f}: examples to a given loss grow "
            f"as 1 + B/B_noise; about {epochs * epoch_s:.0f} s of training"
        )
    else:
        epochs = cfg.train.epochs
        reasons["train.epochs"] = f"as configured; about {epochs * epoch_s:.0f} s of training"
    total_steps = epochs * steps_per_epoch

    # 7. schedule and compile
    warmup = warmup_steps_for(total_steps)
    reasons["train.schedule"] = (
        "linear warm-up, then cosine decay: the large early rate starts gently and the decay ends the run "
        "at a lower loss than a constant rate"
    )
    reasons["train.warmup_steps"] = f"5% of the run's {total_steps:,} steps"
    compile_mode, compile_why = _compile_choice(s.device.type, total_steps, step_s)
    if s.data.is_tokens:  # text batches are cut to their longest line: every new length would recompile
        compile_mode, compile_why = "off", "text batches change length from batch to batch (a recompile each)"
    reasons["train.compile"] = compile_why

    changes = {"train.batch_size": batch, "train.lr": float(f"{lr:.2g}"), "train.epochs": epochs,
               "train.schedule": "warmup-cosine", "train.warmup_steps": warmup, "train.precision": precision,
               "train.compile": compile_mode, "train.threads": threads}  # fmt: skip
    recommended = resolve(base=cfg.to_dict(), flags=changes)
    order = ["train.batch_size", "train.lr", "train.schedule", "train.warmup_steps", "train.epochs",
             "train.precision", "train.compile", "train.threads"]  # fmt: skip
    order = [key for key in order if key in reasons]
    measured["predicted_train_seconds"] = round(epochs * epoch_s, 1)
    return Recommendation(
        recommended, {k: reasons[k] for k in order}, measured, time.perf_counter() - clock.start
    )


def check_out_path(out: Path, overwrite: bool) -> None:
    """A YAML path that ``turbovae train --config`` reads, never replaced without --overwrite."""
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out must end in .yaml or .yml (turbovae train --config reads it), got {out}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .yaml file path")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or --out for another file")


def write_config(cfg: Config, out: Path, header: str) -> Path:
    from .checkpoint import atomic_write
    from .config import to_yaml

    atomic_write(out, (header + to_yaml(cfg)).encode())
    return out


# ---- hyper-parameter search (Optuna) -------------------------------------------------------------------

SEARCH_PARAMS = ("width", "depth", "latent", "lr", "beta")


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search needs Optuna: pip install 'turbovae[search]'") from None
    return optuna


def search_space(cfg: Config, params: Sequence[str]) -> dict[str, tuple[str, Any, Any]]:
    """name -> (kind, low, high) around the configured values: widths ¼× to 2×, depth 1 to 3 (MLP and
    sentence models; a conv net keeps its levels), latent ¼× to 2×, learning rate ÷10 to ×10 and β ½× to
    2× (log scales)."""
    unknown = [p for p in params if p not in SEARCH_PARAMS]
    if unknown:
        from .errors import unknown_name

        raise unknown_name("search parameter", unknown[0], SEARCH_PARAMS)
    m, t = cfg.model, cfg.train
    width = (m.channels if m.name == "conv" else m.hidden)[0]
    space: dict[str, tuple[str, Any, Any]] = {
        "width": ("int", max(8, width // 4), width * 2),
        "depth": ("int", 1, 3),
        "latent": ("int", max(2, m.latent // 4), m.latent * 2),
        "lr": ("float", t.lr / 10, t.lr * 10),
        "beta": ("float", t.beta / 2, t.beta * 2),
    }
    if m.name == "conv":
        space.pop("depth")
    if t.beta == 0:
        space.pop("beta")
    return {k: v for k, v in space.items() if k in params}


def apply_params(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with the searched values in place (validated)."""
    from .config import resolve

    flags: dict[str, Any] = {}
    m = cfg.model
    width = values.get("width")
    if m.name == "conv":
        if width is not None:
            flags["model.channels"] = [int(width) * 2**i for i in range(len(m.channels))]
    elif width is not None or "depth" in values:
        depth = int(values.get("depth", len(m.hidden)))
        flags["model.hidden"] = [int(width if width is not None else m.hidden[0])] * depth
    if "latent" in values:
        flags["model.latent"] = int(values["latent"])
    if "lr" in values:
        flags["train.lr"] = float(f"{values['lr']:.3g}")
    if "beta" in values:
        flags["train.beta"] = float(f"{values['beta']:.3g}")
    return resolve(base=cfg.to_dict(), flags=flags)


def _trial_run(
    s: Setup,
    cfg: Config,
    x_train: torch.Tensor,
    validate: Callable[[Any], float],
    epochs: int,
    report: Callable[[float, int], None],
) -> float:
    """Train a fresh model with ``cfg`` for ``epochs`` epochs over ``x_train``; ``report(nelbo, epoch)`` after
    each epoch with ``validate(vae)`` (it may raise optuna.TrialPruned). Returns the last validation NELBO."""
    from .optim import kl_weight_at, lr_at

    runner = _Runner(s, cfg, cfg.train.seed, x_train=x_train)
    batch = cfg.train.batch_size
    steps_per_epoch = max(1, len(x_train) // batch)
    total = epochs * steps_per_epoch
    value = math.inf
    for epoch in range(epochs):
        last = torch.zeros(())
        for _ in range(steps_per_epoch):
            step = runner.steps
            last = runner.step(batch, lr_at(cfg, step, total), kl_weight_at(cfg, step, total))
        if not math.isfinite(float(last)):
            return math.inf
        value = validate(runner.vae)
        report(value, epoch)
    return value


def search(
    cfg: Config,
    n_trials: int,
    *,
    storage: Path,
    budget: float | None = None,
    trial_epochs: int | None = None,
    params: Sequence[str] = SEARCH_PARAMS,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """An Optuna search (TPE sampler, median pruning on the per-epoch validation NELBO) over ``params``
    around ``cfg``, until the study holds ``n_trials`` finished trials or ``budget`` seconds pass.

    Trials train ``trial_epochs`` epochs (default a fifth of train.epochs, at least 1) on 90% of the
    training split and are scored by the NELBO of the other 10% (a fixed draw): the test split is left
    for the final run. The study lives in the SQLite file ``storage`` under a name derived from the
    config, the trial length and the parameters, so the same command resumes an interrupted search.

    Returns {"config": the best config (with the full epochs), "best_validation_nelbo", "trial" (its
    number), "params", "trials" (count per state), "trial_epochs", "study", "storage"}."""
    optuna = _import_optuna()
    from . import evaluate, runtime
    from .data.batches import binarize, preparer
    from .train import setup

    if n_trials < 1:
        raise ConfigError(f"--search must be >= 1 trials, got {n_trials}")
    if budget is not None and budget <= 0:
        raise ConfigError(f"--budget must be > 0 seconds, got {budget}")
    epochs = trial_epochs if trial_epochs is not None else max(1, cfg.train.epochs // 5)
    if epochs < 1:
        raise ConfigError(f"--trial-epochs must be >= 1, got {epochs}")
    space = search_space(cfg, params)
    if not space:
        raise ConfigError(f"nothing to search: --search-params {','.join(params)} leaves no parameter here")
    runtime.seed_everything(cfg.train.seed)
    s = setup(cfg)
    runtime.configure(s.device, cfg.train.threads)
    n = len(s.x_train)
    n_val = max(1, n // 10)
    if n - n_val < cfg.train.batch_size:
        raise ConfigError(
            f"the search trains on 90% of the {n} training examples, fewer than train.batch_size = "
            f"{cfg.train.batch_size}; lower --batch-size"
        )
    split = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(s.device)
    x_fit, x_val = s.x_train[split[n_val:]], s.x_train[split[:n_val]]
    prepare_val = preparer(s.train_max, False, None)
    if s.binarize_mode == "dynamic":  # a fixed draw, so that every trial is scored on the same data
        x_val, prepare_val = binarize(x_val, s.train_max, seed=4), preparer(1.0, False, None)

    def validate(vae: Any) -> float:
        gen = runtime.generator(s.device, 12345)
        return evaluate.nelbo(vae, x_val, prepare_val, batch_size=cfg.eval.batch_size, generator=gen)["nelbo"]

    key = json.dumps({"config": cfg.to_dict(), "epochs": epochs, "space": space}, sort_keys=True, default=str)
    name = "turbovae-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    storage.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{storage}",
        load_if_exists=True,
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    # seeded past the stored trials: a resumed search does not propose its first points again
    study.sampler = optuna.samplers.TPESampler(seed=cfg.train.seed + len(study.trials))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done:
        log(f"resuming study {name} in {storage}: {done} of {n_trials} trials done")

    def objective(trial: Any) -> float:
        values = {}
        for pname, (kind, low, high) in space.items():
            if kind == "int":
                values[pname] = trial.suggest_int(pname, low, high, log=pname != "depth")
            else:
                values[pname] = trial.suggest_float(pname, low, high, log=True)
        trial_cfg = apply_params(cfg, values)

        def report(value: float, epoch: int) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                log(f"trial {trial.number}: pruned after epoch {epoch + 1} (validation NELBO {value:.2f})")
                raise optuna.TrialPruned()

        t0 = time.perf_counter()
        value = _trial_run(s, trial_cfg, x_fit, validate, epochs, report)
        shown = ", ".join(f"{k} {_show(v)}" for k, v in values.items())
        if not math.isfinite(value):
            log(f"trial {trial.number}: {shown}: diverged")
            raise optuna.TrialPruned()
        log(f"trial {trial.number}: {shown}: validation NELBO {value:.2f} ({time.perf_counter() - t0:.1f} s)")
        return value

    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done, timeout=budget, gc_after_trial=False)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(
            f"no search trial finished (of {len(study.trials)}); raise --budget or --trial-epochs, or lower "
            "--lr"
        )
    best = study.best_trial
    states = [t.state.name.lower() for t in study.trials]
    return {
        "config": apply_params(cfg, best.params),
        "best_validation_nelbo": best.value,
        "trial": best.number,
        "params": best.params,
        "trials": {state: states.count(state) for state in sorted(set(states))},
        "trial_epochs": epochs,
        "study": name,
        "storage": str(storage),
    }


def log_to_stderr(line: str) -> None:
    print(f"tune: {line}", file=sys.stderr, flush=True)
