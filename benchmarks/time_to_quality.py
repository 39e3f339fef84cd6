"""Time to quality, whole process, CPU (issue 3, target 3).

Runs the pytorch/examples MLP VAE loop for 10 epochs (the peer, ../shared/bench/peer_examples.py when
it is there, as a separate process) and `turbovae train --config fmnist-mlp-fast`, each timed from
process start to exit, in the same script; prints one JSON line with both test NELBOs (BCE on grey
values + KL, nats per image: the same quantity for both) and the wall-time ratio.

The speed of a shared machine drifts over minutes (the peer's 10 epochs took 55 to 74 s here within an
hour), and the two runs come one after the other: ``--repeats N`` runs the pair N times, alternating,
and reports each pair's ratio and their median (the headline ``time_ratio``).

    python benchmarks/time_to_quality.py [--peer-epochs 10] [--config fmnist-mlp-fast] [--repeats 3]
    python benchmarks/time_to_quality.py --device cuda     # both on the GPU (benchmarks/gpu.sh)

On a device other than the CPU the peer is benchmarks/peer_examples_device.py (the same loop with the
model and each batch on the device, as pytorch/examples' main.py --cuda runs it).
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
DEVICE_PEER = HERE / "peer_examples_device.py"


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
    p.add_argument("--repeats", type=int, default=1, help="peer and turbovae runs, alternating")
    p.add_argument("--device", default="cpu", help="cpu (the peer of record) or e.g. cuda")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    epochs = ["--epochs", str(args.peer_epochs)]
    peer_argv = [sys.executable, str(PEER), *epochs]
    if args.device != "cpu":
        peer_argv = [sys.executable, str(DEVICE_PEER), *epochs, "--device", args.device]
    elif not PEER.is_file():
        sys.exit(f"the peer script {PEER} is not there (it lives in the project's shared/bench)")
    pairs = []
    for _ in range(args.repeats):
        peer_s, out = timed(peer_argv, cwd=Path(peer_argv[1]).parent)
        peer = json.loads(out.strip().splitlines()[-1])
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            argv = [sys.executable, "-m", "turbovae", "train", "--config", args.config, "--out", str(run),
                    "--progress", "off", "--device", args.device]  # fmt: skip
            ours_s, _ = timed([*argv, *args.overrides])
            summary = json.loads((run / "summary.json").read_text())
        pairs.append((peer_s, ours_s, peer["test_nelbo"], summary))
    by_ratio = sorted(pairs, key=lambda pair: pair[1] / pair[0])
    peer_s, ours_s, peer_nelbo, summary = by_ratio[len(pairs) // 2]  # the median pair (odd N)
    each = [[round(p, 2), round(o, 2), round(o / p, 3)] for p, o, _, _ in pairs]
    print(json.dumps({
        "peer": "pytorch/examples", "device": summary.get("device", args.device),
        "peer_epochs": args.peer_epochs, "peer_process_seconds": round(peer_s, 2),
        "peer_test_nelbo": peer_nelbo, "turbovae_config": args.config,
        "turbovae_process_seconds": round(ours_s, 2), "turbovae_test_nelbo": round(summary["test_nelbo"], 2),
        "turbovae_epochs": round(summary.get("step_limited_epochs", summary["epochs"]), 2),
        "turbovae_steps": summary["steps"],
        "time_ratio": round(ours_s / peer_s, 3),
        "quality_reached": all(s["test_nelbo"] <= nelbo for _, _, nelbo, s in pairs),
        **({"pairs_peer_ours_ratio": each} if len(pairs) > 1 else {}),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
