"""Operators per training step of the hierarchical VAE (issue 35, target 3): how many top-level aten
operators one training step of ``fmnist-hvae-gpu`` runs (at most 1,400 at batch 8; 3,867 before).

A top-level operator is one not called from inside another aten operator: about one kernel launch on
a GPU, one trip through the dispatcher on a CPU. The step is the loop's own (``make_step`` with the
optimiser, the gradient guard and the weight average the config asks for, fed a batch prepared and
noise drawn as the loop does), counted with ``torch.profiler`` as the difference between a 6-step and
a 2-step run over 4, so that set-up, warm-up and profiler overhead cancel. The count is of the
eager step, the one a GPU captures as a CUDA graph; it is the same on every device but for the
dispatcher's own differences (the step takes the multi-tensor path on every device).

Also printed: how many of the operators are views or metadata (detach, view, narrow, split ...: no
kernel on a GPU), the most frequent operator kinds, and the median step time over a few windows (on
a shared CPU only a rough figure: compare ratios measured in one script).

    PYTHONPATH=src python benchmarks/hvae_ops.py                       # fmnist-hvae-gpu, batch 8, fp32
    PYTHONPATH=src python benchmarks/hvae_ops.py --precision bf16 --json
    PYTHONPATH=src python benchmarks/hvae_ops.py --config fmnist-hvae --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import turbovae
from turbovae.data.batches import preparer
from turbovae.engine.optim import GradGuard, kl_weight_at, make_optimizer, weight_average
from turbovae.engine.setup import setup
from turbovae.engine.step import make_step
from turbovae.objectives import noise_shape_of

TARGET = 1400  # issue 35, target 3: at batch 8, fp32
# operators that make no kernel (a view or a change of metadata): counted, and reported apart
VIEWS = {"aten::" + n for n in ("detach", "view", "reshape", "_reshape_alias", "narrow", "select", "slice",
         "split", "split_with_sizes", "chunk", "unbind", "expand", "expand_as", "unsqueeze", "squeeze",
         "flatten", "unflatten", "as_strided", "t", "transpose", "permute", "alias", "view_as", "lift_fresh",
         "contiguous", "item", "_local_scalar_dense")}  # fmt: skip


def build(config: str, batch: int, precision: str, device: torch.device, overrides: list[str]) -> Any:
    """The loop's step for ``config`` at ``batch`` and a function running n steps of it."""
    cfg = turbovae.resolve(config, overrides=[f"train.batch_size={batch}", f"train.precision={precision}",
                                               "train.compile=off", *overrides])  # fmt: skip
    s = setup(cfg, device)
    opt = make_optimizer(cfg, s.vae, device)
    guard = GradGuard(cfg, [p for p in s.vae.parameters() if p.requires_grad], device)
    ema = weight_average(cfg, s.vae, opt)
    scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
    step = make_step(s.vae, opt, scaler, cfg, device, s.precision, guard, ema)
    gen = torch.Generator(device=device).manual_seed(0)
    prepare = preparer(s.train_max, s.binarize_mode == "dynamic", gen)
    anneal = bool(cfg.train.kl_warmup_steps or cfg.train.kl_cycles)
    shape = noise_shape_of(cfg.train.objective, batch, s.vae.latent, cfg.train.iwae_k)
    state = {"step": 0}

    def run(n: int) -> None:
        for _ in range(n):
            i = state["step"] * batch % (len(s.x_train) - batch)
            x = prepare(s.x_train[i : i + batch].to(device))
            eps = torch.randn(shape, generator=gen, device=device)
            if anneal:  # as the loop: β a step argument only under a KL schedule
                step(x, eps, torch.tensor(kl_weight_at(cfg, state["step"], 10_000), device=device))
            else:
                step(x, eps)
            state["step"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return cfg, s, run


def top_level(n: int, run: Any) -> collections.Counter[str]:
    """The top-level aten operators of ``n`` steps, by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(n)
    counts: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            counts[e.name] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="fmnist-hvae-gpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15, help="operator kinds to list")
    p.add_argument("--windows", type=int, default=5, help="timing windows of 5 steps (0: no timing)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.groups=[1,1,1,1,1]")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, s, run = build(args.config, args.batch_size, args.precision, device, args.overrides)
    run(3)  # warm-up: the optimiser's state, the allocator, oneDNN's kernels
    long, short = top_level(6, run), top_level(2, run)
    per_step = {k: (long[k] - short[k]) / 4 for k in long | short}
    total = sum(per_step.values())
    views = sum(v for k, v in per_step.items() if k in VIEWS)
    times = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        run(5)
        times.append((time.perf_counter() - t0) / 5)
    kinds = sorted(((k, v) for k, v in per_step.items() if v), key=lambda kv: -kv[1])
    row = {
        "config": args.config, "batch_size": args.batch_size, "precision": s.precision,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in s.vae.parameters()),
        "parameter_tensors": sum(1 for _ in s.vae.parameters()),
        "ops_per_step": total, "view_ops_per_step": views, "kernel_ops_per_step": total - views,
        "target": TARGET, "step_ms": 1e3 * statistics.median(times) if times else None,
        "top_ops": dict(kinds[: args.top]),
    }  # fmt: skip
    if args.json:
        print(json.dumps(row))
        return
    print(
        f"{args.config} at batch {args.batch_size}, {s.precision}, {device} ({row['threads']} threads), "
        f"torch {torch.__version__}: {row['parameters']:,} parameters in {row['parameter_tensors']} tensors"
    )
    print(
        f"top-level aten operators per training step: {total:,.0f} (target {TARGET:,}; "
        f"{views:,.0f} of them views or metadata, {total - views:,.0f} others)"
    )
    if times:
        print(f"step time, median of {len(times)} windows of 5 steps: {row['step_ms']:.1f} ms")
    for name, count in kinds[: args.top]:
        print(f"{count:8.1f}  {name}{'  (view)' if name in VIEWS else ''}")


if __name__ == "__main__":
    main()
