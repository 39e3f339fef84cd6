"""Can schedule-free AdamW reach the peer's 10-epoch quality in 3 epochs? (issue 18, target 1: the next lever)

The 784-400-20 MLP of pytorch/examples in `optimisers.py`'s plain fp32 loop (its `run`: the same seed
and batches for every variant, test NELBO after each epoch, one posterior sample per image), with
schedulefree's AdamWScheduleFree warming up over 5% of the steps. Each argument is one variant, a JSON
object of `lr` (1e-2), `beta1` (0.9), `beta2` (0.999), `epochs` (3) and `bias` (false; true: the
decoder's output bias starts at the logit of the mean training image, as in Burda et al.'s IWAE code).
Prints one JSON line per variant.

    python benchmarks/sf_three_epochs.py '{}' '{"bias": true}' '{"bias": true, "beta2": 0.99, "lr": 0.015}'
"""

from __future__ import annotations

import json
import sys

import schedulefree
import torch
from optimisers import VAE, run  # this folder's: its loop, seeds and evaluation


def variant(xtr: torch.Tensor, xte: torch.Tensor, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999,
            epochs: int = 3, bias: bool = False, batch: int = 128) -> dict:  # fmt: skip
    def factory(params: list, lr: float, warm: int) -> torch.optim.Optimizer:
        return schedulefree.AdamWScheduleFree(params, lr=lr, betas=(beta1, beta2), warmup_steps=warm)

    def start_at_the_mean_image(model: VAE) -> None:
        with torch.no_grad():
            model.fc4.bias.copy_(torch.logit(xtr.double().mean(0), eps=1e-3).float())  # as MLPNet does

    row = run(
        "sf-adamw", factory, lr, True, xtr, xte, epochs, batch, start_at_the_mean_image if bias else None
    )
    return {"train_s": row["train_s"], "test_nelbo_by_epoch": row["test_nelbo_by_epoch"]}


def main() -> None:
    import fmnist  # ../shared/bench/fmnist.py, on the path through optimisers.py

    xtr, xte = (torch.from_numpy(fmnist.load(split)[0]) for split in ("train", "test"))
    for spec in sys.argv[1:] or ["{}"]:
        print(json.dumps({"variant": json.loads(spec), **variant(xtr, xte, **json.loads(spec))}), flush=True)


if __name__ == "__main__":
    main()
