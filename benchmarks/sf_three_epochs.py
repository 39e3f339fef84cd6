"""Can schedule-free AdamW reach the peer's 10-epoch quality in 3 epochs? (issue 18, target 1: the next lever)

The 784-400-20 MLP of pytorch/examples (`optimisers.py`'s VAE) in a plain fp32 loop, the same seed and
batches for every variant, schedulefree's AdamWScheduleFree with its own warm-up, test NELBO after each
epoch (one posterior sample per image). Each argument is one variant, a JSON object of
`lr` (1e-2), `beta1` (0.9), `beta2` (0.999), `warmup` (0.05: share of the steps), `epochs` (3) and
`bias` (false; true: the decoder's output bias starts at the logit of the mean training image, as in
Burda et al.'s IWAE code). Prints one JSON line per variant.

    python benchmarks/sf_three_epochs.py '{}' '{"bias": true}' '{"bias": true, "beta2": 0.99, "lr": 0.015}'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import schedulefree
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "shared" / "bench"))
from optimisers import VAE


def run(xtr: torch.Tensor, xte: torch.Tensor, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999,
        warmup: float = 0.05, epochs: int = 3, bias: bool = False, batch: int = 128) -> dict:  # fmt: skip
    torch.manual_seed(1)
    model = VAE()
    if bias:
        with torch.no_grad():
            p = xtr.mean(0).clamp(1e-3, 1 - 1e-3)
            model.fc4.bias.copy_(torch.log(p) - torch.log1p(-p))
    steps = len(xtr) // batch
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=lr, betas=(beta1, beta2),
                                         warmup_steps=max(1, round(warmup * steps * epochs)))  # fmt: skip
    order, curve, train_s = torch.Generator().manual_seed(2), [], 0.0
    for _ in range(epochs):
        opt.train()
        perm = torch.randperm(len(xtr), generator=order)
        t0 = time.perf_counter()
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            model.nelbo(xtr[perm[i * batch : (i + 1) * batch]]).backward()
            opt.step()
        train_s += time.perf_counter() - t0
        opt.eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            total = sum(model.nelbo(xte[j : j + 1000], gen).item() * 1000 for j in range(0, len(xte), 1000))
        curve.append(round(total / len(xte), 2))
    return {"train_s": round(train_s, 1), "test_nelbo_by_epoch": curve}


def main() -> None:
    import fmnist  # ../shared/bench/fmnist.py: Debian's dataset-fashion-mnist

    xtr, xte = (torch.from_numpy(fmnist.load(split)[0]) for split in ("train", "test"))
    for spec in sys.argv[1:] or ["{}"]:
        print(json.dumps({"variant": json.loads(spec), **run(xtr, xte, **json.loads(spec))}), flush=True)


if __name__ == "__main__":
    main()
