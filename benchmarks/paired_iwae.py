"""Two runs' IWAE NLLs on the same test images, and the standard error of their difference.

``turbovae eval`` reports each run's mean −log p(x) with the standard error over images (how much the
mean would move with another test set). Two models scored on the *same* images differ by much less
than that spread suggests, because an image that is hard for one is hard for the other: the right
error bar for "A beats B" is the standard error of the per-image differences.

    python benchmarks/paired_iwae.py runs/equal-time/hvae runs/equal-time/mlp --iwae-k 100

Prints one JSON object: each run's NLL, the mean difference A − B in nats (negative: A is better),
its paired standard error, and the fraction of images on which A is better.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from turbovae import evaluation as evaluate
from turbovae import runtime
from turbovae.engine.rundir import load
from turbovae.engine.setup import setup


def per_image_nll(run: str, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device("cpu")
    vae = load(run, device)
    s = setup(vae.config, device, vae.data_meta)
    x, prepare = s.split("test")
    r = evaluate.iwae_log_likelihood(vae, x, prepare, k=k, generator=runtime.generator(device, seed))
    return -r["log_px"].double(), prepare(x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--iwae-k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = p.parse_args()
    runtime.configure(torch.device("cpu"), args.threads)
    a, xa = per_image_nll(args.run_a, args.iwae_k, args.seed)
    b, xb = per_image_nll(args.run_b, args.iwae_k, args.seed)
    if xa.shape != xb.shape or not torch.equal(xa, xb):
        print(
            "the two runs' test images differ (another data set, resize, data.test_fraction or binarisation)",
            file=sys.stderr,
        )
        return 2
    d = a - b
    n = len(d)
    result = {
        "k": args.iwae_k,
        "n": n,
        "a": {"run": args.run_a, "nll": a.mean().item(), "stderr": a.std().item() / math.sqrt(n)},
        "b": {"run": args.run_b, "nll": b.mean().item(), "stderr": b.std().item() / math.sqrt(n)},
        "a_minus_b": d.mean().item(),
        "paired_stderr": d.std().item() / math.sqrt(n),
        "a_better_fraction": (d < 0).double().mean().item(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
