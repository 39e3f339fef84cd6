"""The hierarchical VAE against the flat MLP VAE at equal wall time on this CPU (issue 10).

Both models train at the same time, side by side, one torch thread each (so they see the same machine:
a busy moment slows both), and both stop after the same seconds of training (``train.time_limit``).
The HVAE's epochs (the span of its warm-up + cosine schedule) are set from its samples/s, measured
first with `turbovae bench` (the two benches also side by side), so that its schedule ends near the
budget; the MLP preset's learning rate is constant, so it gets twice its measured epochs and the time
limit alone decides where it stops. Then both are evaluated by the same command with the same k, one
after the other.

    python benchmarks/hvae_vs_mlp.py --budget 900 --out runs/equal-time            # binarised, Bernoulli
    python benchmarks/hvae_vs_mlp.py --budget 900 --out runs/equal-time-8bit --eight-bit

``--eight-bit``: both models on the 8-bit grey values with the discretised logistic mixture
(``--binarize none``), scored in bits/dim. Prints one JSON object per model and a Markdown table.
Extra settings for one side: ``--hvae-set key=value`` / ``--mlp-set key=value`` (repeatable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TRAIN_EXAMPLES = 60_000  # Fashion-MNIST's training split


def turbovae(*args: str) -> list[str]:
    return [sys.executable, "-m", "turbovae", *args]


def side_by_side(commands: dict[str, list[str]], logs: Path) -> dict[str, str]:
    """Run the commands at the same time; their stdout by name (exit on a failure, with its stderr)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, argv in commands.items():
        err = (logs / f"{name}.stderr").open("w")
        procs[name] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True), err)
    out = {}
    for name, (proc, err) in procs.items():
        stdout, _ = proc.communicate()
        err.close()
        if proc.returncode != 0:
            sys.exit(f"{' '.join(commands[name])} failed; see {logs / f'{name}.stderr'}")
        out[name] = stdout
    return out


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=900.0, help="training seconds per model")
    p.add_argument("--out", type=Path, default=Path("runs/equal-time"))
    p.add_argument("--eight-bit", action="store_true")
    p.add_argument("--hvae-config", default="fmnist-hvae")
    p.add_argument("--mlp-config", default="fmnist-mlp")
    p.add_argument("--hvae-set", action="append", default=[])
    p.add_argument("--mlp-set", action="append", default=[])
    p.add_argument("--iwae-k", type=int, default=100)
    p.add_argument("--eval-threads", type=int, default=2)
    args = p.parse_args()

    data = ["--likelihood", "discretized-logistic", "--binarize", "none"] if args.eight_bit else []
    sides = {
        "hvae": ["--config", args.hvae_config, *data, *args.hvae_set],
        "mlp": ["--config", args.mlp_config, *data, *args.mlp_set],
    }
    one_thread = ["train.threads=1"]
    bench = side_by_side(
        {name: turbovae("bench", *argv, *one_thread, "--json", "--windows", "3", "--window-steps", "20")
         for name, argv in sides.items()},
        args.out / "logs",
    )  # fmt: skip
    speed = {name: last_json(text)["samples_per_second"] for name, text in bench.items()}
    epochs = {name: max(1, round(args.budget * sps / TRAIN_EXAMPLES)) for name, sps in speed.items()}
    epochs["mlp"] *= 2  # constant lr: the time limit stops it
    print(json.dumps({"bench_samples_per_second": speed, "epochs": epochs}), flush=True)

    runs = {name: args.out / name for name in sides}
    side_by_side(
        {name: turbovae("train", *argv, *one_thread, "--out", str(runs[name]), "--epochs", str(epochs[name]),
                        "--progress", "off", "--overwrite", "eval.iwae_k=0", "eval.every_epoch=false",
                        f"train.time_limit={args.budget}")
         for name, argv in sides.items()},
        args.out / "logs",
    )  # fmt: skip

    rows = []
    for name, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        ev = subprocess.run(
            turbovae("eval", str(run), "--iwae-k", str(args.iwae_k), "--threads", str(args.eval_threads),
                     "--json"),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = last_json(ev.stdout)
        row = {
            "model": name,
            "command": " ".join(
                [
                    "turbovae train",
                    *sides[name],
                    *one_thread,
                    "--epochs",
                    str(epochs[name]),
                    f"train.time_limit={args.budget}",
                ]
            ),
            "epochs": round(summary.get("time_limited_epochs", summary["epochs"]), 2),
            "train_seconds": round(summary["train_seconds"], 1),
            "samples_per_second": round(summary["samples_per_second"]),
            "test_nelbo": round(summary["test_nelbo"], 2),
            "nll_iwae": round(result["nll_iwae"], 2),
            "nll_iwae_se": round(result["nll_iwae_stderr"], 2),
            # printed under the names earlier RESULTS tables use: bpd of the IWAE estimate, bpd_nelbo
            "bpd": round(result["bpd_iwae"], 4) if result["bpd_iwae"] is not None else None,
            "bpd_nelbo": round(result["bpd"], 4) if result["bpd"] is not None else None,
            "k": args.iwae_k,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| model | epochs | train s | samples/s | test NELBO | IWAE NLL (k) | bits/dim: NELBO, IWAE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['epochs']} | {r['train_seconds']} | {r['samples_per_second']:,} | "
              f"{r['test_nelbo']} | {r['nll_iwae']} ± {r['nll_iwae_se']} ({r['k']}) | "
              f"{r['bpd_nelbo']}, {r['bpd']} |")  # fmt: skip


if __name__ == "__main__":
    main()
