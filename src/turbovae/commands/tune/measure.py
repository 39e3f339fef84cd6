"""tune's measurements on the configured model: its own short runs (a fresh model and optimiser), the
throughput per batch size (timed by turbovae.commands.bench with the step `turbovae train` runs), the
gradient-noise scale and Smith's (2017) learning-rate range test."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ... import runtime
from ...config import Config
from ...data.batches import gather
from ...engine.noise import NoiseScale
from ...engine.optim import lr_tensor, make_optimizer
from ...engine.setup import Setup, build_vae
from ...engine.step import Task
from ...models import model_spec
from ...objectives import noise_shape_of
from ..bench import bench_turbovae
from .rules import smooth, suggest_lr


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
    """Adam's diagonal preconditioner P = 1/(√v̂ + ε) per parameter (Adamax: 1/(u + ε); schedule-free
    AdamW normalises by the same v̂) from the optimiser's state, or None before its first step and for
    optimisers without one (SGD).

    Measured with ``squared_norm(g, P)``, the noise scale is B_simple of the problem in the coordinates where
    Adam's update is a plain gradient step. B_simple equals the true noise scale when the Hessian is a
    multiple of the identity (McCandlish et al. 2018, section 2.2); the preconditioner brings it closer to
    that, and on Fashion-MNIST the preconditioned value (about 100 after a few epochs) predicted the examples
    larger batches needed better than the plain one (about 35)."""
    if sync := getattr(opt, "sync_host", None):  # schedule-free's k, kept on the device on CUDA
        sync()
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    weights = []
    for p in params:
        state, group = opt.state.get(p), group_of.get(id(p))
        # steps taken: Adam's per-parameter count, or schedule-free AdamW's per-group k
        if not state or group is None:
            return None
        steps = state.get("step", group.get("k"))
        if steps is None or float(steps) < 1:
            return None
        if "exp_avg_sq" in state:
            beta2 = group["betas"][1]
            v_hat = state["exp_avg_sq"].float() / (1 - beta2 ** float(steps))
            weights.append(1.0 / (v_hat.sqrt() + group["eps"]))
        elif "exp_inf" in state:
            weights.append(1.0 / (state["exp_inf"].float() + group["eps"]))
        else:
            return None
    return weights


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


def fresh_vae(s: Setup, cfg: Config, seed: int) -> Any:
    """A newly initialised VAE for ``cfg`` on the set-up's device, laid out as ``engine.setup`` lays it."""
    torch.manual_seed(seed)
    vae = build_vae(cfg, s.data.event_shape, s.data.meta)
    return runtime.place(vae, s.device, model_spec(cfg.model.name).channels_last)


class Runner:
    """A fresh model and optimiser, stepped at a learning rate chosen per step: tune's own short runs
    (throughput is timed by turbovae.bench with the step `turbovae train` runs)."""

    def __init__(self, s: Setup, cfg: Config, seed: int, x_train: torch.Tensor | None = None) -> None:
        self.s, self.cfg, self.device = s, cfg, s.device
        self.vae = fresh_vae(s, cfg, seed)
        self.vae.train()
        self.opt = make_optimizer(cfg, self.vae, s.device)
        self.params = [p for p in self.vae.parameters() if p.requires_grad]
        # the objective as `turbovae train` calls it
        self.forward = runtime.with_precision(Task(self.vae, cfg), s.device, s.precision)
        # the VAE's latent width: a hierarchical net's is all its groups, not model.latent
        self.noise_shape = functools.partial(noise_shape_of, cfg.train.objective, latent=self.vae.latent,
                                             k=cfg.train.iwae_k)  # fmt: skip
        self.gen_data = runtime.generator(s.device, seed)
        self.gen_noise = runtime.generator(s.device, seed + 1)
        self.prepare = s.kind.preparer(s.train_max, s.binarize_mode == "dynamic", self.gen_data)
        self.x = s.x_train if x_train is None else x_train
        self.perm = torch.randperm(len(self.x), generator=self.gen_data, device=s.device)
        self.position = 0
        self.scaler = runtime.grad_scaler(s.device, s.precision)
        self.steps = 0

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``size`` examples of a shuffled pass (reshuffled as it runs out), prepared, and noise."""
        if self.position + size > len(self.perm):
            self.perm = torch.randperm(len(self.x), generator=self.gen_data, device=self.device)
            self.position = 0
        rows = self.perm[self.position : self.position + size]
        on_host = self.x.device != self.device  # memory-mapped training rows: gathered on the host
        x = self.prepare(gather(self.x, rows, self.device) if on_host else self.x[rows])
        self.position += size
        eps = torch.randn(self.noise_shape(len(x)), generator=self.gen_noise, device=self.device)
        return x, eps

    def loss(self, x: torch.Tensor, eps: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        return self.forward(x, eps, beta)["loss"]  # beta None: train.beta

    def step(self, size: int, lr: float, beta: float | None = None) -> torch.Tensor:
        """One optimisation step at learning rate ``lr``; the loss, detached, still on the device."""
        lr_tensor(self.opt).fill_(lr)  # optim.make_optimizer's lr is a device tensor
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


def throughput_sweep(
    s: Setup,
    batches: Sequence[int],
    *,
    deadline: float | None = None,
    windows: int = 3,
    log: Callable[[str], None] = lambda _: None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Samples/s and peak memory of the training step ``turbovae train`` runs (eager: compiling is judged
    separately), per batch size in increasing order, with turbovae.bench.bench_turbovae.

    One measurement's windows run back to back in a fraction of a second, and on a shared machine a
    moment without other work can make all of them fast (27,003 samples/s at a batch that runs 6,977):
    the CONFIRMED fastest batches are measured ``repeats`` times in all, in turns (another work's coming
    and going falls on each alike), and each keeps the median of its measurements (``measurements``).
    The repeats need the time of the sweep's own measurements of them, and are left out (``repeats`` 1)
    where ``deadline`` leaves none.

    Stops at the first batch that does not fit: on CUDA at an out-of-memory error; on the CPU when the
    next batch would need more than half the memory still available (peak RSS grows with the batch), when
    throughput falls below 70% of the best so far (the step's time explodes), or when the next batch is
    predicted (its warm-up and windows at the last step time, scaled by the batch) to overrun
    ``deadline``. Peak memory is the device's peak on CUDA and the process's peak resident set size on the
    CPU."""
    points: list[dict[str, Any]] = []
    stopped, last_rss = "all sizes measured", None
    steps = 5
    setups: dict[int, tuple[Config, int]] = {}  # batch -> its config and window steps, for the repeats
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
            runtime.free_cached_memory(s.device)
            stopped = f"out of memory at batch {batch}"
            break
        point = {"batch_size": batch, "samples_per_second": result["samples_per_second"],
                 "step_ms": result["step_ms"], "peak_memory_bytes": result["peak_memory_bytes"],
                 "measurements": [result["samples_per_second"]]}  # fmt: skip
        points.append(point)
        setups[batch] = (cfg, steps)
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
        runtime.free_cached_memory(s.device)
    _repeat(s, points, setups, repeats, windows, deadline, log)
    largest = points[-1]["batch_size"] if points else None
    return {"points": points, "stopped": stopped, "largest_batch": largest,
            "memory": "device peak" if s.device.type == "cuda" else "process peak RSS"}  # fmt: skip


CONFIRMED = 3  # the fastest batches measured again (an outlier is fast by being one)


def _repeat(
    s: Setup, points: list[dict[str, Any]], setups: dict[int, tuple[Config, int]], repeats: int,
    windows: int, deadline: float | None, log: Callable[[str], None],
) -> None:  # fmt: skip
    """Measure the CONFIRMED fastest of ``points`` until each has ``repeats`` measurements, in turns, and
    give each the median of its own (see ``throughput_sweep``)."""
    top = sorted(points, key=lambda p: -p["samples_per_second"])[:CONFIRMED]
    for _ in range(repeats - 1):
        cost = sum(p["seconds"] for p in top)  # a measurement takes about what the sweep's did
        if deadline is not None and time.perf_counter() + cost > deadline:
            break
        for point in top:
            cfg, steps = setups[point["batch_size"]]
            again = dataclasses.replace(s, cfg=cfg, vae=fresh_vae(s, cfg, cfg.train.seed))
            point["measurements"].append(bench_turbovae(again, windows, steps)["samples_per_second"])
            del again
            runtime.free_cached_memory(s.device)
    for point in top:
        runs = point["measurements"]
        if len(runs) > 1:
            point["samples_per_second"] = float(statistics.median(runs))
            point["step_ms"] = 1e3 * point["batch_size"] / point["samples_per_second"]
            log(f"batch {point['batch_size']:>6}: {point['samples_per_second']:>11,.0f} samples/s, the "
                f"median of {', '.join(f'{r:,.0f}' for r in runs)}")  # fmt: skip


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
    runner = Runner(s, cfg, seed)
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
    runner = Runner(s, cfg, cfg.train.seed)
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
    runner = Runner(s, cfg, seed)
    lo, hi = (1e-4, 10.0) if cfg.train.optimizer == "sgd" else (1e-5, 1.0)
    return lr_range_test(lambda lr: float(runner.step(batch, lr)), lo, hi, steps, deadline=deadline)
