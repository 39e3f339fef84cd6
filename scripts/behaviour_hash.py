"""Hash seeded runs, so that a refactor can show it changed no behaviour.

    python scripts/behaviour_hash.py OUT_DIR            # one line per run: name, hash of every part
    python scripts/behaviour_hash.py OUT_DIR --json F   # also write the hashes to F

Each run trains on the CPU with one thread (fp32, eager) and is hashed three ways: every checkpoint
tensor (``checkpoints/*.safetensors``, by name), ``summary.json`` without its timings and host
description, and ``turbovae eval --json`` (IWAE k=20) without timings. Run it on the commit before and
after a change and compare the lines: equal lines are bitwise-equal runs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

TIMINGS = ("seconds", "per_second", "device", "threads", "floor", "eta")


def _clean(obj: object, out: str) -> object:
    """``obj`` without timings, host descriptions and the output folder's path (runs in two folders
    compare equal)."""
    if isinstance(obj, dict):
        return {k: _clean(v, out) for k, v in sorted(obj.items()) if not any(t in k for t in TIMINGS)}
    if isinstance(obj, list):
        return [_clean(v, out) for v in obj]
    return obj.replace(out, "OUT") if isinstance(obj, str) else obj


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _tensors(run: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((run / "checkpoints").glob("*.safetensors")):
        for name, arr in sorted(load_file(str(f)).items()):
            h.update(f"{f.name}:{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _table(path: Path) -> None:
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*bc.feature_names[:4], "diagnosis"])
        for row, label in zip(bc.data[:, :4], bc.target, strict=True):
            w.writerow([*(f"{v:g}" for v in row), bc.target_names[label]])


RUNS: dict[str, list[str]] = {
    "digits-mlp": ["--config", "digits-mlp", "train.epochs=2"],
    "digits-conv": ["--config", "digits-conv", "train.epochs=1"],
    "words-char": ["--config", "words-char", "train.max_steps=30", "eval.iwae_k=10"],
    "table": ["--data", "csv:{table}", "train.epochs=20", "--batch-size", "64"],
    "hvae": ["--config", "digits-mlp", "--model", "hvae", "model.channels=[16,16]", "train.epochs=1"],
    "conditional": ["--config", "digits-mlp", "data.condition=label", "train.epochs=2"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "table.csv"
    _table(table)
    hashes: dict[str, dict[str, str]] = {}
    for name, extra in RUNS.items():
        if args.only and name not in args.only:
            continue
        run = args.out / name
        cmd = [sys.executable, "-m", "turbovae.cli", "train", "--out", str(run), "--overwrite", "--seed", "0",
               "train.threads=1", "--precision", "fp32", "--compile", "off",
               *(a.format(table=table) for a in extra)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        ev_cmd = [sys.executable, "-m", "turbovae.cli", "eval", str(run), "--iwae-k", "20", "--json",
                  "--seed", "0", "--threads", "1"]  # fmt: skip
        ev = subprocess.run(ev_cmd, check=True, capture_output=True, text=True)
        summary = json.loads((run / "summary.json").read_text())
        hashes[name] = {
            "tensors": _tensors(run),
            "summary": _digest(_clean(summary, str(args.out))),
            "eval": _digest(_clean(json.loads(ev.stdout), str(args.out))),
        }
        print(name, " ".join(f"{k}={v}" for k, v in hashes[name].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(hashes, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
