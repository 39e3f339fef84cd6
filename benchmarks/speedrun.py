"""Speedrun: process seconds to a test NELBO at or below 244.2 on Fashion-MNIST (issue 18, target 6).

The same job for every entrant: the 784-400-20 MLP VAE, BCE on grey values + analytic KL (nats per
image, one posterior sample per test image), all 60,000 training images, the 10,000 test images.
Entrants, each a separate process timed from start to exit, all in this one script:

- pytorch/examples' loop (`../shared/bench/peer_examples.py`, Adam 1e-3, batch 128),
- pythae 0.1.2 (`peer_pythae.py`, the same model and recipe, through its TrainingPipeline),
- JAX + optax with each epoch one jitted `lax.scan` (`peer_jax_scan.py`, Adam 1e-3, batch 128),
- `turbovae train --config fmnist-mlp-fast` (and any other preset named with `--configs`).

An entrant's recipe fixes everything but the number of epochs: each one runs with its starting epoch
count and, while its test NELBO is above the target, again with one epoch more (up to `--max-epochs`).
Its time is the whole-process time of the first run that reached the target. Prints one JSON line per
run, then a markdown table of the entrants with their time relative to pytorch/examples'.

    python benchmarks/speedrun.py [--target 244.2] [--only examples,pythae,jax,turbovae]
        [--start examples=10,pythae=10,jax=11] [--jax-python /path/to/venv/bin/python]

pythae and JAX need their own packages (`pip install pythae`; JAX in its own venv: `pip install jax
optax`); `--pythae-python` and `--jax-python` name the interpreters that have them (default: this
one). An entrant whose interpreter lacks its package is skipped with a note. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from time_to_quality import timed  # this folder's: one process, timed from start to exit

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent.parent / "shared" / "bench"
SCRIPTS = {"examples": "peer_examples.py", "pythae": "peer_pythae.py", "jax": "peer_jax_scan.py"}
MODULES = {"examples": "torch", "pythae": "pythae", "jax": "optax"}


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def run_peer(name: str, python: str, epochs: int) -> tuple[float, float]:
    seconds, out = timed([python, SCRIPTS[name], "--epochs", str(epochs)], cwd=PEERS)
    return seconds, float(json.loads(out.strip().splitlines()[-1])["test_nelbo"])


def run_turbovae(config: str, epochs: int) -> tuple[float, float, float]:
    """(seconds, test NELBO, epochs trained: fewer than asked where the preset's train.max_steps ends it)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        argv = ["turbovae", "train", "--config", config, "--epochs", str(epochs), "--out", str(run),
                "--progress", "off"]  # fmt: skip
        seconds, _ = timed(argv)
        summary = json.loads((run / "summary.json").read_text())
        return seconds, float(summary["test_nelbo"]), round(summary.get("step_limited_epochs", epochs), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=244.2)
    p.add_argument("--only", default="examples,pythae,jax,turbovae")
    p.add_argument("--configs", default="fmnist-mlp-fast", help="turbovae presets, comma-separated")
    p.add_argument("--start", default="examples=10,pythae=10,jax=10,fmnist-mlp-fast=4",
                   help="starting epochs per entrant (peers and presets); others start at 10")  # fmt: skip
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--pythae-python", default=sys.executable)
    p.add_argument("--jax-python", default=sys.executable)
    args = p.parse_args()
    start = {k: int(v) for k, v in (item.split("=") for item in args.start.split(",") if item)}
    only = args.only.split(",")
    pythons = {"examples": sys.executable, "pythae": args.pythae_python, "jax": args.jax_python}
    entrants: list[tuple[str, str]] = [(n, n) for n in SCRIPTS if n in only]
    if "turbovae" in only:
        entrants += [(f"turbovae {c}", c) for c in args.configs.split(",")]
    if not PEERS.is_dir():
        sys.exit(f"the peers' folder {PEERS} is not there (it lives in the project's shared/bench)")

    rows = []
    for label, key in entrants:
        if key in SCRIPTS and not has_module(pythons[key], MODULES[key]):
            print(f"# {label}: skipped, {pythons[key]} cannot import {MODULES[key]}", file=sys.stderr)
            continue
        attempts: list[tuple[float, float, float]] = []
        epochs = start.get(key, 10)
        while epochs <= args.max_epochs:
            if key in SCRIPTS:
                (seconds, nelbo), trained = run_peer(key, pythons[key], epochs), float(epochs)
            else:
                seconds, nelbo, trained = run_turbovae(key, epochs)
            attempts.append((trained, seconds, nelbo))
            print(json.dumps({"entrant": label, "epochs": trained, "process_seconds": round(seconds, 2),
                              "test_nelbo": round(nelbo, 2)}), flush=True)  # fmt: skip
            if nelbo <= args.target:
                break
            epochs += 1
        reached = attempts[-1][2] <= args.target
        rows.append((label, attempts, reached))

    base = next((a[-1][1] for label, a, ok in rows if label == "examples" and ok), None)
    print("\n| entrant | epochs | process s | test NELBO | vs pytorch/examples | runs (epochs: NELBO) |")
    print("|---|---|---|---|---|---|")
    for label, attempts, reached in rows:
        epochs, seconds, nelbo = attempts[-1]
        ratio = f"{seconds / base:.2f}" if reached and base else "-"
        tried = ", ".join(f"{e:g}: {n:.2f}" for e, _, n in attempts)
        shown = f"{seconds:.1f}" if reached else f"not reached by {epochs} epochs"
        print(
            f"| {label} | {f'{epochs:g}' if reached else '-'} | {shown} | {nelbo:.2f} | {ratio} | {tried} |"
        )


if __name__ == "__main__":
    main()
