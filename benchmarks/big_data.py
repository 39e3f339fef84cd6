"""Data bigger than memory (issue 21 part 4): the MLP trained on a 4 GB uint8 ``.npy``, memory-mapped,
against the same kind of data held in memory.

Makes ``DIR/big.npy``: 5,100,000 Fashion-MNIST-like images (1x28x28 uint8, 4.0 GB): the 70,000 real
Fashion-MNIST images (train + test) tiled 73 times and cut to length, each tile shifted by a random
(-2..2, -2..2) pixels, with random noise of +-8 grey levels, and its rows in a fresh random order. Then
runs ``turbovae train`` (the fmnist-mlp preset's 784-400-20 MLP, dynamically binarised, Bernoulli) as a
subprocess for a fixed training time on

- ``big.npy``, memory-mapped (the run under test), and
- ``DIR/slice.npz``: its first 1,280,000 rows (1.0 GB) as ``x_train``/``x_test`` in an ``.npz``, which
  is read into memory. Samples/s is per-step work (one batch gathered, one step), so a 1 GB slice
  compares fairly with the 4 GB file and keeps the in-memory run's own RAM at about 1 GB;

after ``os.sync()`` (a first trial, started while the 5 GB just written were still being written
back, ran the mapped run at 0.43x), polling ``/proc/PID/status`` every 10 ms for the peak ``RssAnon``
(anonymous memory: the file's cached pages are left out) and ``VmRSS``, and reading samples/s from
each run's summary.json. Both runs: the
same config, ``data.test_fraction=0.01`` (the final evaluation's test split stays small),
``eval.iwae_k=0``, one thread. Prints one JSON object; deletes the files it made unless ``--keep``.

    python benchmarks/big_data.py --dir /tmp/big [--seconds 60] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS = 5_100_000
SLICE = 1_280_000
SRC = Path(__file__).resolve().parent.parent / "src"


def make_data(folder: Path, rows: int = ROWS, seed: int = 0) -> Path:
    """DIR/big.npy as the module docstring says, written a tile at a time (never whole in memory)."""
    sys.path.insert(0, str(SRC))
    from turbovae.data import load_dataset

    fmnist = load_dataset("fashion-mnist")
    base = np.concatenate([fmnist.x_train.numpy(), fmnist.x_test.numpy()])  # (70000, 1, 28, 28)
    path = folder / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 1, 28, 28))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, len(base)):
        n = min(len(base), rows - start)
        dy, dx = rng.integers(-2, 3, size=2)
        tile = np.roll(base[rng.permutation(len(base))[:n]], (int(dy), int(dx)), axis=(2, 3)).astype(np.int16)
        tile += rng.integers(-8, 9, size=tile.shape, dtype=np.int16)
        out[start : start + n] = np.clip(tile, 0, 255).astype(np.uint8)
    out.flush()
    del out
    return path


def make_slice(big: Path, folder: Path, rows: int) -> Path:
    """DIR/slice.npz: the first ``rows`` rows, split as the .npy is (its last 1% for test), in memory."""
    x = np.load(big, mmap_mode="r")[:rows]
    n_test = round(rows * 0.01)
    path = folder / "slice.npz"
    np.savez(path, x_train=x[: rows - n_test], x_test=x[rows - n_test :])
    return path


def status(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def train(data: Path, out: Path, seconds: float) -> dict[str, float]:
    """One `turbovae train` run; its peak memory (polled) and samples/s."""
    cmd = [sys.executable, "-m", "turbovae", "train", "--config", "fmnist-mlp", "--data", str(data),
           "--out", str(out), "--overwrite", "--progress", "off", "--epochs", "1", "train.threads=1",
           f"train.time_limit={seconds}", "data.test_fraction=0.01", "eval.iwae_k=0",
           "eval.every_epoch=false"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    log = out.with_suffix(".log")  # (a file, not a pipe: a full pipe would stall the run)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        peak: dict[str, int] = {}
        while proc.poll() is None:
            for key, value in status(proc.pid).items():
                peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "samples_per_second": summary["samples_per_second"],
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": time.perf_counter() - t0,
        "n_train": summary["n_train"],
        "peak_rss_anon_gib": peak.get("RssAnon", 0) / 2**30,
        "peak_vm_rss_gib": peak.get("VmRSS", 0) / 2**30,
        "peak_rss_file_gib": peak.get("RssFile", 0) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="folder for the 4 GB file (needs about 5 GB free)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds of each run")
    parser.add_argument("--keep", action="store_true", help="keep the files made")
    parser.add_argument("--rows", type=int, default=ROWS, help="images in the file (a smaller trial run)")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        big = make_data(folder, args.rows)
        made = time.perf_counter() - t0
        small = make_slice(big, folder, args.rows * SLICE // ROWS)
        os.sync()  # the 5 GB just written are on disk before any run is timed (writeback slows a run)
        mapped = train(big, folder / "run-mapped", args.seconds)
        memory = train(small, folder / "run-memory", args.seconds)
    finally:
        if not args.keep:
            runs = [f"run-{kind}{end}" for kind in ("mapped", "memory") for end in ("", ".log")]
            for name in ("big.npy", "slice.npz", *runs):
                target = folder / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    result = {
        "file_gb": args.rows * 784 / 1e9,
        "slice_gb": args.rows * SLICE // ROWS * 784 / 1e9,
        "make_seconds": made,
        "mapped": mapped,
        "in_memory_slice": memory,
        "speed_ratio_mapped_over_memory": mapped["samples_per_second"] / memory["samples_per_second"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
