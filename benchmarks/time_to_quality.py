"""Time to quality, whole process, CPU (issue 3, target 3).

Runs the pytorch/examples MLP VAE loop for 10 epochs (the peer, ../shared/bench/peer_examples.py when
it is there, as a separate process) and `turbovae train --config fmnist-mlp-fast`, each timed from
process start to exit, in the same script; prints one JSON line with both test NELBOs (BCE on grey
values + KL, nats per image: the same quantity for both) and the wall-time ratio.

    python benchmarks/time_to_quality.py [--peer-epochs 10] [--config fmnist-mlp-fast]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = HERE.parent.parent / "shared" / "bench" / "peer_examples.py"


def timed(argv: list[str], cwd: Path | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return seconds, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer-epochs", type=int, default=10)
    p.add_argument("--config", default="fmnist-mlp-fast")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if not PEER.is_file():
        sys.exit(f"the peer script {PEER} is not there (it lives in the project's shared/bench)")
    peer_s, out = timed([sys.executable, str(PEER), "--epochs", str(args.peer_epochs)], cwd=PEER.parent)
    peer = json.loads(out.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        argv = ["turbovae", "train", "--config", args.config, "--out", str(run), "--progress", "off"]
        ours_s, _ = timed([*argv, *args.overrides])
        summary = json.loads((run / "summary.json").read_text())
    print(json.dumps({
        "peer": "pytorch/examples", "peer_epochs": args.peer_epochs, "peer_process_seconds": round(peer_s, 2),
        "peer_test_nelbo": peer["test_nelbo"], "turbovae_config": args.config,
        "turbovae_process_seconds": round(ours_s, 2), "turbovae_test_nelbo": round(summary["test_nelbo"], 2),
        "turbovae_epochs": summary["epochs"], "turbovae_batch_size": summary.get("batch_size"),
        "time_ratio": round(ours_s / peer_s, 3),
        "quality_reached": summary["test_nelbo"] <= peer["test_nelbo"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
