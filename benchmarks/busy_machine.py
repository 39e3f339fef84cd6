"""Issue 18, target 4: training speed on a busy machine, defaults against every fixed setting.

Starts ``--burners`` CPU-bound processes (a Python busy loop each, as other work on a laptop would be),
then, under that load, runs ``turbovae train --config C`` (by default ``fmnist-mlp-fast``: the
784-400-20 MLP on Fashion-MNIST, batch 128; ``digits-mlp`` is the README's demo) for ``--seconds`` of
training each (``train.time_limit``):

- with the defaults (``train.threads 0``, ``train.precision auto``: decided by measurement);
- with each of {1, 2 threads} x {fp32, bf16};

and pytorch/examples' script for one epoch under the same load. Prints one JSON line: samples/s of
each (examples / training seconds, from summary.json and the peer's own timer), the process seconds,
and the defaults' ratio to the best fixed setting.

    python benchmarks/busy_machine.py [--config fmnist-mlp-fast] [--burners 2] [--seconds 15] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = HERE.parent.parent / "shared" / "bench" / "peer_examples.py"


def burn() -> None:
    while True:
        pass


def train(config: str, out: Path, seconds: float, extra: list[str]) -> dict[str, object]:
    argv = ["turbovae", "train", "--config", config, "--out", str(out), "--progress", "off",
            f"train.time_limit={seconds}", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TURBOVAE_PROBE")}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    process = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    switches = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"threads"' in line
    ]
    return {"samples_per_second": round(s["samples_per_second"]), "process_seconds": round(process, 1),
            "threads": start["threads"], "precision": start["precision"], "probe": start.get("probe"),
            "thread_changes": [e["threads"] for e in switches if e["event"] == "threads"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--config", default="fmnist-mlp-fast", help="the preset to train (digits-mlp: the demo)")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    burners = [mp.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for p in burners:
        p.start()
    results: dict[str, object] = {"config": args.config, "burners": args.burners, "seconds": args.seconds}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"defaults (auto)": []} | {
                f"{t} thread(s), {p}": [f"train.threads={t}", f"train.precision={p}"]
                for t in (1, 2) for p in ("fp32", "bf16")
            }  # fmt: skip
            for i, (name, extra) in enumerate(runs.items()):
                results[name] = train(args.config, Path(tmp) / f"run{i}", args.seconds, extra)
                print(name, results[name], file=sys.stderr, flush=True)
            if not args.no_peer and PEER.exists():
                out = subprocess.run([sys.executable, str(PEER), "--epochs", "1"], capture_output=True,
                                     text=True, check=True, cwd=PEER.parent).stdout  # fmt: skip
                peer = json.loads(out.strip().splitlines()[-1])
                results["pytorch/examples, 1 epoch"] = {"samples_per_second": round(60000 / peer["train_s"])}
    finally:
        for p in burners:
            p.terminate()
    fixed = [v["samples_per_second"] for k, v in results.items() if "thread(s)" in k]  # type: ignore[index]
    auto = results["defaults (auto)"]["samples_per_second"]  # type: ignore[index]
    results["defaults / best fixed"] = round(auto / max(fixed), 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
