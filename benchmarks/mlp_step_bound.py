"""What the 784-400-20 MLP VAE's training step at batch B cannot go below on this machine (issue 3).

Times, in one process, every matrix product of one training step (forward, and the backward's input
and weight gradients; fp32, the threads torch uses), the Adam update of the model's 0.65 M parameters
(fused, the optimiser turbovae uses) and the pytorch/examples loop's step, and prints the lower bound
on turbovae's step (the products plus the update, with nothing else) against the step time that
3× the peer's samples/s would need.

    python benchmarks/mlp_step_bound.py [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeats: int = 7, inner: int = 50) -> float:
    """Median seconds of one call, over ``repeats`` runs of ``inner`` calls after a warm-up."""
    for _ in range(inner):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    b = args.batch_size
    layers = [(784, 400), (400, 40), (20, 400), (400, 784)]  # encoder (μ and log σ in one), decoder
    products = []
    for fan_in, fan_out in layers:
        x, w, g = torch.randn(b, fan_in), torch.randn(fan_in, fan_out), torch.randn(b, fan_out)
        products.append(("forward", b, fan_in, fan_out, lambda x=x, w=w: x @ w))
        products.append(("weight grad", fan_in, b, fan_out, lambda x=x, g=g: x.T @ g))
        if fan_in != 784:  # the input needs no gradient
            products.append(("input grad", b, fan_out, fan_in, lambda g=g, w=w: g @ w.T))
    rows, total = [], 0.0
    for kind, m, k, n, fn in products:
        s = timed(fn)
        total += s
        rows.append({"product": kind, "m_k_n": [m, k, n], "us": round(s * 1e6, 1),
                     "gflops": round(2 * m * k * n / s / 1e9, 1)})  # fmt: skip
    params = [torch.nn.Parameter(torch.randn(a, c)) for a, c in layers] + [
        torch.nn.Parameter(torch.randn(c)) for _, c in layers
    ]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    adam = timed(opt.step, inner=20)
    n = 4096
    a, c = torch.randn(n, n), torch.randn(n, n)
    ceiling = 2 * n**3 / timed(lambda: a @ c, repeats=3, inner=2)
    flops = sum(2 * m * k * n_ for _, m, k, n_, _ in products)
    print(json.dumps({
        "batch_size": b, "threads": torch.get_num_threads(), "products": rows,
        "products_us": round(total * 1e6), "products_gflops": round(flops / total / 1e9, 1),
        "fused_adam_us": round(adam * 1e6), "bound_step_us": round((total + adam) * 1e6),
        "bound_samples_per_second": round(b / (total + adam)),
        "ceiling_gflops_4096": round(ceiling / 1e9, 1),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
