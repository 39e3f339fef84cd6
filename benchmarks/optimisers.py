"""Optimisers side by side on the time-to-quality job (issue 18, target 1).

The 784-400-20 MLP VAE of pytorch/examples on Fashion-MNIST, BCE on grey values + analytic KL (nats
per image), the whole training set in memory, a fresh permutation each epoch, the same seed and the
same batches for every optimiser, fp32 eager. Each optimiser runs `--epochs` epochs with its own
recipe: the schedule-free ones at a constant rate after their own warm-up, the others with a warm-up
of 5% of the steps then cosine to zero (Adam at a constant 1e-3 is the peer's recipe). After every
epoch the test NELBO (one posterior sample per image, a fixed generator) is measured outside the
timer. Prints one JSON line per run, then a table.

    python benchmarks/optimisers.py [--epochs 3] [--batch-size 128] [--only adam-cosine,sf-adamw] [--lrs 1e-2]

Needs `heavyball` and `pytorch-optimizer` (`pip install -e '.[optimizers]'`; `schedulefree` is a
dependency of turbovae); a library that is not installed is skipped with a note. heavyball's update
runs eagerly here, like the others (`--heavyball-compile` lets it torch.compile the update, its own
default). `--lrs 1e-2,2e-2` replaces each candidate's own learning rates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "shared" / "bench"))


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def nelbo(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        eps = torch.randn(mu.shape, generator=gen) if gen is not None else torch.randn_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        logits = self.fc4(F.relu(self.fc3(z)))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (rec + kl) / len(x)


def _lib(name: str) -> Any:
    return importlib.import_module(name)


# name -> (library, factory(params, lr, warmup_steps), rates, schedule-free?)
def candidates() -> dict[str, tuple[str, Callable[..., torch.optim.Optimizer], list[float], bool]]:
    def hb(cls: str) -> Callable[..., torch.optim.Optimizer]:
        return lambda p, lr, warm: getattr(_lib("heavyball"), cls)(p, lr=lr, weight_decay=0.0)

    def po(cls: str, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
        return lambda p, lr, warm: getattr(_lib("pytorch_optimizer"), cls)(p, lr=lr, **kw)

    return {
        "adam-peer": ("torch", lambda p, lr, warm: torch.optim.Adam(p, lr=lr), [1e-3], True),
        "adam-cosine": ("torch", lambda p, lr, warm: torch.optim.Adam(p, lr=lr), [2e-3, 4e-3, 8e-3], False),
        "sf-adamw": ("schedulefree", lambda p, lr, warm: _lib("schedulefree").AdamWScheduleFree(
            p, lr=lr, warmup_steps=warm), [5e-3, 1e-2, 2e-2], True),
        "sf-adamw-b99": ("schedulefree", lambda p, lr, warm: _lib("schedulefree").AdamWScheduleFree(
            p, lr=lr, warmup_steps=warm, betas=(0.9, 0.99)), [1e-2], True),
        "sf-radam": ("schedulefree", lambda p, lr, warm: _lib("schedulefree").RAdamScheduleFree(p, lr=lr),
                     [5e-3, 1e-2], True),
        "hb-soap": ("heavyball", hb("SOAP"), [3e-3], False),
        "hb-psgd-kron": ("heavyball", hb("PSGDKron"), [1e-3, 3e-3], False),
        "hb-sf-adamw": ("heavyball", lambda p, lr, warm: _lib("heavyball").SFAdamW(
            p, lr=lr, warmup_steps=warm), [5e-3, 1e-2], True),
        "hb-muon-adamw": ("heavyball", hb("MuonAdamW"), [2.5e-3, 1e-2], False),
        "hb-adopt": ("heavyball", hb("ADOPT"), [2.5e-3, 5e-3], False),
        "po-lion": ("pytorch_optimizer", po("Lion"), [3e-4, 1e-3], False),
        "po-adan": ("pytorch_optimizer", po("Adan"), [3e-3, 1e-2], False),
        "po-prodigy": ("pytorch_optimizer", po("Prodigy"), [1.0], False),
        "po-ademamix": ("pytorch_optimizer", po("AdEMAMix"), [2e-3, 5e-3], False),
    }  # fmt: skip


def run(name: str, factory: Callable[..., torch.optim.Optimizer], lr: float, schedule_free: bool,
        xtr: torch.Tensor, xte: torch.Tensor, epochs: int, batch: int,
        init: Callable[[VAE], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """``init``: changes the freshly built model before its optimiser is made (sf_three_epochs.py's)."""
    torch.manual_seed(1)
    model = VAE()
    if init is not None:
        init(model)
    steps_per_epoch = len(xtr) // batch
    total = steps_per_epoch * epochs
    warm = max(1, total // 20)
    t0 = time.perf_counter()
    opt = factory(list(model.parameters()), lr, warm)
    build_s = time.perf_counter() - t0
    bases = [g["lr"] for g in opt.param_groups]
    perm_gen = torch.Generator().manual_seed(2)
    curve, train_s, step = [], 0.0, 0
    for _ in range(epochs):
        if hasattr(opt, "train"):
            opt.train()
        model.train()
        perm = torch.randperm(len(xtr), generator=perm_gen)
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            if not schedule_free:  # warm-up then cosine to zero
                f = (
                    (step + 1) / warm
                    if step < warm
                    else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
                )
                for g, base in zip(opt.param_groups, bases, strict=True):
                    g["lr"] = base * f
            x = xtr[perm[i * batch : (i + 1) * batch]]
            opt.zero_grad(set_to_none=True)
            loss = model.nelbo(x)
            loss.backward()
            opt.step()
            step += 1
        if not math.isfinite(loss.item()):
            curve.append(math.nan)
            break
        train_s += time.perf_counter() - t0
        if hasattr(opt, "eval"):
            opt.eval()
        model.eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            total = sum(model.nelbo(xte[j : j + 1000], gen).item() * 1000 for j in range(0, len(xte), 1000))
        curve.append(total / len(xte))
    return {"optimizer": name, "lr": lr, "epochs": epochs, "batch_size": batch, "train_s": round(train_s, 2),
            "build_s": round(build_s, 2), "samples_per_s": round(step * batch / max(train_s, 1e-9)),
            "test_nelbo_by_epoch": [round(v, 2) for v in curve]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--only", default="", help="comma-separated names (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--lrs", default="", help="comma-separated learning rates instead of each one's own")
    p.add_argument("--heavyball-compile", action="store_true", help="let heavyball torch.compile its update")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fmnist  # ../shared/bench/fmnist.py: Debian's dataset-fashion-mnist

    xtr, xte = (torch.from_numpy(fmnist.load(s)[0]) for s in ("train", "test"))
    chosen = [n for n in args.only.split(",") if n]
    rows = []
    for name, (lib, factory, rates, sf) in candidates().items():
        if chosen and name not in chosen:
            continue
        try:
            mod = importlib.import_module(lib)
        except ImportError:
            print(f"# {name}: {lib} is not installed, skipped", file=sys.stderr)
            continue
        if lib == "heavyball" and not args.heavyball_compile:
            mod.utils.compile_mode = None
        for lr in [float(v) for v in args.lrs.split(",") if v] or rates:
            row = run(name, factory, lr, sf, xtr, xte, args.epochs, args.batch_size)
            row["library"] = f"{lib} {getattr(mod, '__version__', '')}".strip()
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n| optimiser | lr | samples/s | {' | '.join(f'epoch {e + 1}' for e in range(args.epochs))} |")
    print(f"|---|---|---|{'---|' * args.epochs}")
    for r in rows:
        cells = " | ".join(f"{v:.2f}" for v in r["test_nelbo_by_epoch"])
        print(f"| {r['optimizer']} ({r['library']}) | {r['lr']:g} | {r['samples_per_s']:,} | {cells} |")


if __name__ == "__main__":
    main()
