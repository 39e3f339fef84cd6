"""Does tune find fast recipes beyond the MLP? Time to equal test NELBO, tuned against preset against the
peer's recipe, for the conv model and the hierarchical VAE on Fashion-MNIST (issue 18, target 5).

For each preset (default `fmnist-conv` and `fmnist-hvae`), three entrants, every run a separate
`turbovae train` process timed from start to exit, all in this one script, all on the 60,000 training
images (`data.validation=0`) and scored by the test NELBO of the 10,000 test images (no IWAE: it is not
what is being timed):

- **the peer's recipe**: pytorch/examples' (Adam 1e-3, constant, batch 128, fp32, eager) on the preset's
  model, for `--peer-epochs`; its test NELBO is the target;
- **the preset** as shipped (its optimiser, schedule, precision and compile);
- **tuned**: `turbovae tune --config PRESET train.optimizer=schedulefree train.schedule=constant
  --budget B`: tune's batch, learning rate (the range test), precision, compile and threads, with
  schedule-free AdamW, the kind of recipe `fmnist-mlp-fast` is.

The preset and tuned entrants run 1, 2, ... epochs (up to `--max-epochs`) until the test NELBO is at or
below the target; an entrant's time is the whole-process time of the first run that reached it (the
tuned runs' warm-up is 5% of each run's steps, as tune sets it). tune's own seconds are reported apart.
Prints one JSON line per run, then a markdown table.

    python benchmarks/tune_recipes.py [--configs fmnist-conv,fmnist-hvae] [--peer-epochs 2] [--budget 120]

Run it on a quiet machine: on 2 CPU cores it takes about half an hour.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from time_to_quality import timed  # this folder's: one process, timed from start to exit

COMMON = ["data.validation=0", "eval.iwae_k=0"]
PEER = ["train.optimizer=adam", "train.lr=1e-3", "train.schedule=constant", "train.warmup_steps=0",
        "train.batch_size=128", "train.precision=fp32", "train.compile=off", "train.ema=0"]  # fmt: skip
SCHEDULE_FREE = ["train.optimizer=schedulefree", "train.schedule=constant"]
N_TRAIN = 60_000


def train(config: str, epochs: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        argv = ["turbovae", "train", "--config", config, "--epochs", str(epochs), "--out", str(run),
                "--progress", "off", *COMMON, *overrides]  # fmt: skip
        seconds, _ = timed(argv)
        summary = json.loads((run / "summary.json").read_text())
    return {"process_seconds": round(seconds, 2), "test_nelbo": round(float(summary["test_nelbo"]), 2)}


def tune(config: str, budget: float, out: Path) -> dict:
    argv = ["turbovae", "tune", "--config", config, "--budget", str(budget), "--out", str(out), "--overwrite",
            "--json", *COMMON, *SCHEDULE_FREE]  # fmt: skip
    seconds, stdout = timed(argv)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"process_seconds": round(seconds, 2), "choices": result["choices"]}


def ladder(label: str, config: str, target: float, max_epochs: int, overrides_for) -> list[dict]:
    runs: list[dict] = []
    for epochs in range(1, max_epochs + 1):
        run = {"entrant": label, "epochs": epochs, **train(config, epochs, overrides_for(epochs))}
        print(json.dumps(run), flush=True)
        runs.append(run)
        if run["test_nelbo"] <= target:
            break
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="fmnist-conv,fmnist-hvae")
    p.add_argument("--peer-epochs", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--budget", type=float, default=120.0, help="tune's --budget, seconds")
    args = p.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            peer = {"entrant": "peer's recipe", "epochs": args.peer_epochs,
                    **train(config, args.peer_epochs, PEER)}  # fmt: skip
            print(json.dumps({"config": config, **peer}), flush=True)
            target = peer["test_nelbo"]
            preset = ladder("preset", config, target, args.max_epochs, lambda e: [])
            tuned_yaml = Path(tmp) / f"{config}-tuned.yaml"
            tuned = tune(config, args.budget, tuned_yaml)
            print(json.dumps({"config": config, "tune": tuned}), flush=True)
            batch = int(tuned["choices"]["train.batch_size"])

            def warmup(epochs: int, batch: int = batch) -> list[str]:  # 5% of the run, as tune sets it
                return [f"train.warmup_steps={max(1, round(0.05 * epochs * (N_TRAIN // batch)))}"]

            tuned_runs = ladder("tuned", str(tuned_yaml), target, args.max_epochs, warmup)
            table.append((config, peer, preset, tuned, tuned_runs))

    print("\n| preset | entrant | recipe | epochs | process s | test NELBO | vs the peer's recipe | runs "
          "(epochs: NELBO) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for config, peer, preset, tuned, tuned_runs in table:
        c = tuned["choices"]
        recipe = (f"schedule-free, batch {c['train.batch_size']}, lr {c['train.lr']:.2g}, "
                  f"{c['train.precision']}, compile {c['train.compile']} "
                  f"(tune: {tuned['process_seconds']:.0f} s)")  # fmt: skip
        print(f"| {config} | peer's recipe | Adam 1e-3, batch 128, fp32 | {peer['epochs']} | "
              f"{peer['process_seconds']:.1f} | {peer['test_nelbo']:.2f} | 1.00 | |")  # fmt: skip
        for label, runs, what in (("preset", preset, "as shipped"), ("tuned", tuned_runs, recipe)):
            last = runs[-1]
            reached = last["test_nelbo"] <= peer["test_nelbo"]
            tried = ", ".join(f"{r['epochs']}: {r['test_nelbo']:.2f}" for r in runs)
            ratio = f"{last['process_seconds'] / peer['process_seconds']:.2f}" if reached else "-"
            shown = f"{last['process_seconds']:.1f}" if reached else f"not reached in {last['epochs']} epochs"
            print(f"| {config} | {label} | {what} | {last['epochs'] if reached else '-'} | {shown} | "
                  f"{last['test_nelbo']:.2f} | {ratio} | {tried} |")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
