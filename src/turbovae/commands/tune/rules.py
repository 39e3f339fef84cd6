"""What tune does with its measurements: the learning rate when the batch changes, the warm-up, the
range test's suggestion, the batch with the least predicted time to a given loss, and compile."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ... import runtime


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


def range_test_divisor(optimizer: str) -> float:
    """What the range test's ``lr_min`` is divided by for ``optimizer``: 4 (:func:`suggest_lr`), and 1 for
    schedule-free AdamW, which averages its iterates instead of decaying the rate: it runs at its peak for
    the whole run, and its best rates sit at the edge (schedulefree's authors use 1-10x a scheduled Adam's).
    On Fashion-MNIST (784-400-20, batch 128) the range test's minimum was about 1e-2, and schedule-free at
    1e-2 beat 5e-3 at every epoch from 1 to 4 and matched 2e-2 (benchmarks/RESULTS.md, the optimisers)."""
    return 1.0 if optimizer == "schedulefree" else 4.0


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


def show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def compile_choice(device_type: str, steps: int, step_s: float) -> tuple[str, str]:
    """Compile only when the run is long enough to repay it, with the numbers runtime.StepCompiler uses."""
    cost, speedup = runtime.compile_estimate(device_type)
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
