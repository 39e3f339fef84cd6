"""The training step's time in two source trees of turbovae, measured in turns on a shared machine.

Two worker processes (one per tree, PYTHONPATH=TREE/src) each build the loop's step (``make_step``
with the config's optimiser, the gradient guard and the weight average) once, then run a window of
``--steps`` steps whenever the driver says so. The driver alternates them (A B, B A, ...), so both
see the same load, and prints each tree's best and median window and the median of the paired
ratios B / A. One thread each by default; fp32 unless ``--precision``.

    python benchmarks/step_time_ab.py /tmp/before /work/wt-hvae --config fmnist-hvae-gpu --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(config: str, batch: int, steps: int, precision: str, threads: int) -> None:
    import torch

    import turbovae
    from turbovae.engine.optim import GradGuard, make_optimizer, weight_average
    from turbovae.engine.setup import setup
    from turbovae.engine.step import make_step

    torch.set_num_threads(threads)
    cfg = turbovae.resolve(config, overrides=[f"train.batch_size={batch}", f"train.precision={precision}",
                                               "train.compile=off"])  # fmt: skip
    device = torch.device("cpu")
    s = setup(cfg, device)
    opt = make_optimizer(cfg, s.vae, device)
    guard = GradGuard(cfg, [p for p in s.vae.parameters() if p.requires_grad], device)
    step = make_step(s.vae, opt, None, cfg, device, s.precision, guard, weight_average(cfg, s.vae, opt))
    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.bernoulli(s.x_train[i * batch : (i + 1) * batch].float() / 255, generator=gen) for i in range(8)
    ]
    eps = [torch.randn(batch, s.vae.latent, generator=gen) for _ in range(8)]
    for i in range(3):
        step(xs[i], eps[i])
    print("ready", flush=True)
    k = 0
    for _ in sys.stdin:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(xs[k % 8], eps[k % 8])
            k += 1
        print(1e3 * (time.perf_counter() - t0) / steps, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a", help="a checkout of turbovae (its src/ is imported)")
    p.add_argument("tree_b")
    p.add_argument("--config", default="fmnist-hvae-gpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=3, help="steps a window")
    p.add_argument("--pairs", type=int, default=16, help="windows of each tree")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.config, args.batch_size, args.steps, args.precision, args.threads)
        return
    opts = ["--config", args.config, "--batch-size", str(args.batch_size), "--precision", args.precision,
            "--steps", str(args.steps), "--threads", str(args.threads), "--worker", "a", "b"]  # fmt: skip
    procs = {}
    for name, tree in (("A", args.tree_a), ("B", args.tree_b)):
        env = {**os.environ, "PYTHONPATH": os.path.join(os.path.abspath(tree), "src")}
        pipe = subprocess.PIPE
        command = [sys.executable, os.path.abspath(__file__), *opts]
        procs[name] = subprocess.Popen(
            command, env=env, text=True, stdin=pipe, stdout=pipe, stderr=subprocess.DEVNULL
        )
    for proc in procs.values():
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != "ready":
            if proc.poll() is not None:
                sys.exit(f"a worker failed (rc {proc.returncode}): run it with --worker to see why")

    def window(name: str) -> float:
        proc = procs[name]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    times: dict[str, list[float]] = {"A": [], "B": []}
    ratios = []
    for i in range(args.pairs):
        t = {name: window(name) for name in (("A", "B") if i % 2 == 0 else ("B", "A"))}
        for name, ms in t.items():
            times[name].append(ms)
        ratios.append(t["B"] / t["A"])
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    for name, tree in (("A", args.tree_a), ("B", args.tree_b)):
        v = times[name]
        print(
            f"{name} {tree}: best {min(v):.2f} ms, median {statistics.median(v):.2f} ms a step "
            f"({len(v)} windows of {args.steps})"
        )
    print(
        f"B / A: best/best {min(times['B']) / min(times['A']):.3f}, "
        f"median of paired ratios {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
