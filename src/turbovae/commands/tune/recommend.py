"""tune's recommendation (:func:`tune`): throughput per batch size up to the largest that fits, the
gradient-noise scale and an LR range test within a time budget, then a config with one reason per choice."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ... import runtime
from ...config import Config, resolve, to_yaml
from ...engine.checkpoint import atomic_write
from ...engine.setup import Setup, setup
from ...errors import ConfigError
from .measure import measure_noise_scale, run_range_test, throughput_sweep, time_steps
from .rules import (
    candidate_batches,
    choose_batch,
    compile_choice,
    range_test_divisor,
    scale_lr,
    show,
    warmup_steps_for,
)

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
        lines += [f"#   {key} = {show(value)}: {self.reasons[key]}" for key, value in self.choices().items()]
        return "\n".join(lines) + "\n"


class _Clock:
    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + budget

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())

    def share(self, fraction: float) -> float:
        """A deadline ``fraction`` of the time left from now."""
        return time.perf_counter() + fraction * self.left()


@dataclasses.dataclass
class _Tuning:
    """What the stages of :func:`tune` share: the set-up, the clock, and what they measured and chose."""

    s: Setup
    cfg: Config
    clock: _Clock
    log: Callable[[str], None]
    measured: dict[str, Any]
    reasons: dict[str, str]  # config key -> one line


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
    measured: dict[str, Any] = {"device": runtime.describe(s.device), "data": s.data.name,
                                "n_train": len(s.x_train), "setup_seconds": round(setup_s, 2)}  # fmt: skip
    t = _Tuning(s, cfg, clock, log, measured, {})
    log(f"{s.data.name}, {cfg.model.name}, {runtime.describe(s.device)}, precision {s.precision}; "
        f"budget {budget:.0f} s")  # fmt: skip
    threads = _choose_threads(t)
    measured["device"] = runtime.describe(s.device)
    speed, b_noise = _sweep(t, budget)
    # 3. the batch: least predicted time to a given loss
    batch, why = choose_batch(speed, b_noise)
    t.reasons["train.batch_size"] = why
    precision = _choose_precision(t, batch, speed)
    t.s = s = dataclasses.replace(s, precision=precision)
    lr = _choose_lr(t, batch, speed)
    step_s = batch / speed[batch]
    epochs = _choose_epochs(t, batch, step_s, b_noise, train_budget, started_after + setup_s)
    total_steps = epochs * max(1, len(s.x_train) // batch)
    reasons = t.reasons
    # 7. schedule and compile
    warmup = warmup_steps_for(total_steps)
    schedule = "constant" if cfg.train.optimizer == "schedulefree" else "warmup-cosine"
    reasons["train.schedule"] = (
        "linear warm-up, then cosine decay: the large early rate starts gently and the decay ends the run "
        "at a lower loss than a constant rate"
        if schedule == "warmup-cosine"
        else "linear warm-up, then constant: schedule-free AdamW evaluates its average instead of decaying"
    )
    reasons["train.warmup_steps"] = f"5% of the run's {total_steps:,} steps"
    compile_mode, compile_why = compile_choice(s.device.type, total_steps, step_s)
    if not s.kind.fixed_shapes:  # text batches are cut to their longest line: a recompile per new length
        compile_mode = "off"
        compile_why = f"{s.kind.name} batches change length from batch to batch (a recompile each)"
    reasons["train.compile"] = compile_why

    changes = {"train.batch_size": batch, "train.lr": float(f"{lr:.2g}"), "train.epochs": epochs,
               "train.schedule": schedule, "train.warmup_steps": warmup, "train.precision": precision,
               "train.compile": compile_mode, "train.threads": threads}  # fmt: skip
    if cfg.train.max_steps:  # the recipe's length is its epochs: a step limit of the base would cut it
        changes["train.max_steps"] = 0
        reasons["train.max_steps"] = f"0 (was {cfg.train.max_steps}): the recommended epochs set the length"
    recommended = resolve(base=cfg.to_dict(), flags=changes)
    order = ["train.batch_size", "train.lr", "train.schedule", "train.warmup_steps", "train.epochs",
             "train.max_steps", "train.precision", "train.compile", "train.threads"]  # fmt: skip
    order = [key for key in order if key in reasons]
    measured["predicted_train_seconds"] = round(total_steps * step_s, 1)
    return Recommendation(
        recommended, {k: reasons[k] for k in order}, measured, time.perf_counter() - clock.start
    )


def _choose_threads(t: _Tuning) -> int:
    # 0. CPU threads: torch's default against one, back to back (on cores busy with other work, more threads
    # than free cores collapse: a step can take 10-50× as long), at the configured batch
    s, cfg, reasons, base_batch = t.s, t.cfg, t.reasons, t.cfg.train.batch_size
    threads = cfg.train.threads
    if s.device.type == "cpu" and threads == 0 and torch.get_num_threads() > 1:
        default = torch.get_num_threads()
        many = time_steps(s, cfg, base_batch)
        torch.set_num_threads(1)
        one = time_steps(s, cfg, base_batch)
        t.measured["threads_step_seconds"] = {str(default): many, "1": one}
        t.log(
            f"batch {base_batch:>6}: {1e3 * many:.2f} ms/step with {default} threads, {1e3 * one:.2f} with 1"
        )
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

    return threads


def _sweep(t: _Tuning, budget: float) -> tuple[dict[int, float], float | None]:
    """Samples/s per batch size, and the gradient-noise scale (None where the run diverged)."""
    s, cfg, measured, clock, log = t.s, t.cfg, t.measured, t.clock, t.log
    base_batch, n_train = cfg.train.batch_size, len(s.x_train)
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

    return speed, b_noise


def _choose_precision(t: _Tuning, batch: int, speed: dict[int, float]) -> str:
    """bf16 (or fp16) where it was measured faster than fp32 at ``batch``; updates ``speed`` to match."""
    s, cfg, reasons, clock, log = t.s, t.cfg, t.reasons, t.clock, t.log
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
            t.measured["precision_samples_per_second"] = {s.precision: fast, "fp32": slow}
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

    return precision


def _choose_lr(t: _Tuning, batch: int, speed: dict[int, float]) -> float:
    """The LR range test's suggestion at ``batch``, else the batch-scaling rule."""
    s, cfg, reasons, clock, log = t.s, t.cfg, t.reasons, t.clock, t.log
    base_batch, base_lr, optimizer = cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer
    # 5. the learning rate at that batch: the range test, else the scaling rule
    scaled = scale_lr(base_lr, base_batch, batch, optimizer)
    rule = "linear" if optimizer == "sgd" else "square-root"
    step_s = batch / speed[batch]
    range_steps = int(min(300, clock.left() * 0.8 / (1.5 * step_s)))
    lr_test: dict[str, Any] | None = None
    if range_steps >= 60:
        lr_test = run_range_test(s, cfg, batch, range_steps, deadline=clock.share(0.9))
        t.measured["lr_range_test"] = {
            k: lr_test[k] for k in ("lr", "lr_min", "lr_steep", "stopped", "steps")
        }
        log(f"LR range test at batch {batch}: {lr_test['steps']} steps, smoothed loss lowest at lr "
            f"{show(lr_test['lr_min'])}; stopped: {lr_test['stopped']}")  # fmt: skip
    if lr_test is not None and lr_test["lr"] is not None:
        divisor = range_test_divisor(optimizer)
        lr = lr_test["lr_min"] / divisor
        share = "a quarter of " if divisor == 4 else "" if divisor == 1 else f"1/{divisor:g} of "
        why = "; schedule-free AdamW runs at its peak rate, averaging, not decaying" if divisor == 1 else ""
        reasons["train.lr"] = (
            f"{share}{show(lr_test['lr_min'])}, where the LR range test's smoothed loss bottomed out at "
            f"batch {batch}{why} ({rule} scaling of {show(base_lr)} at batch {base_batch}: {show(scaled)})"
        )
    else:
        lr = scaled
        reasons["train.lr"] = (
            f"{rule} scaling of {show(base_lr)} from batch {base_batch} (no time for an LR test)"
        )

    return lr


def _choose_epochs(t: _Tuning, batch: int, step_s: float, b_noise: float | None, train_budget: float | None,
                   start_s: float) -> int:  # fmt: skip
    """Fit ``train_budget`` (``start_s``: imports and data, as measured in this process), or match the
    configured run's quality at the new batch."""
    s, cfg, reasons = t.s, t.cfg, t.reasons
    base_batch, n_train = cfg.train.batch_size, len(s.x_train)
    # 6. epochs: fit the training budget, or match the configured run's quality at the new batch
    steps_per_epoch = max(1, n_train // batch)
    epoch_s = steps_per_epoch * step_s
    if train_budget is not None:
        per_epoch_eval = epoch_s * 0.2 * len(s.x_test) / n_train if cfg.eval.every_epoch else 0.0
        final_eval = epoch_s * len(s.x_test) / n_train * (0.5 + 0.3 * cfg.eval.iwae_k) + 1.0
        epochs = max(1, int((train_budget - start_s - final_eval) / (epoch_s + per_epoch_eval)))
        reasons["train.epochs"] = (
            f"fit --train-budget {train_budget:g} s: {epoch_s:.2f} s per epoch at {batch / step_s:,.0f} "
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
    return epochs


def check_out_path(out: Path, overwrite: bool) -> None:
    """A YAML path that ``turbovae train --config`` reads, never replaced without --overwrite."""
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out must end in .yaml or .yml (turbovae train --config reads it), got {out}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .yaml file path")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or --out for another file")


def write_config(cfg: Config, out: Path, header: str) -> Path:
    atomic_write(out, (header + to_yaml(cfg)).encode())
    return out


# ---- hyper-parameter search (Optuna) -------------------------------------------------------------------


def log_to_stderr(line: str) -> None:
    print(f"tune: {line}", file=sys.stderr, flush=True)
