"""turbovae against TVAE (SDV's ctgan) on scikit-learn's breast-cancer table, in one process.

Both models get the same training rows (turbovae's deterministic 90/10 split of the 569 rows), the
same epochs and batch size, the same torch thread count, and are scored by the same measures
(``turbovae.fidelity``) on the same held-out real rows. Timed: the whole ``fit`` of each (TVAE: its
transformer and training loop; turbovae: reading the CSV, fitting the transforms, training, the final
test evaluation and the checkpoint). Repeated with seeds 0..repeats−1, interleaved, so that a busy
machine slows both alike.

Needs ctgan, which is not a turbovae dependency; install it beside turbovae without replacing torch:

    python -m venv --system-site-packages ~/venvs/ctgan && ~/venvs/ctgan/bin/pip install ctgan
    ~/venvs/ctgan/bin/python benchmarks/tabular_vs_tvae.py --epochs 300 --batch-size 500 --repeats 3

Prints one JSON line per fit and a summary table (medians of the times, means of the measures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import turbovae
from turbovae.data.arrays import split_indices
from turbovae.data.tables import Column, Table, export_tables, read_table
from turbovae.evaluation.fidelity import fidelity_report
from turbovae.kinds.table import synthesize

MEASURES = ("mean_ks", "mean_tv", "corr_mae", "ml_efficacy", "dcr_median")


def _from_frame(frame: Any, schema: Table) -> Table:
    """A pandas DataFrame of TVAE's samples as a Table with the real table's column types."""
    columns = []
    for c in schema.columns:
        if c.type == "categorical":
            values = np.array([None if v != v else str(v) for v in frame[c.name]], dtype=object)
        else:
            values = frame[c.name].to_numpy(dtype=np.float64)
        columns.append(Column(c.name, c.type, values, c.decimals, c.tokens))
    return Table(columns, "tvae")


def _measures(report: dict[str, Any]) -> dict[str, float]:
    return {
        "mean_ks": report["mean_ks"],
        "mean_tv": report["mean_tv"],
        "corr_mae": report["corr_mae"],
        "ml_efficacy": report["ml_efficacy"]["synthetic"],
        "dcr_median": report["dcr"]["median"],
    }


def run_tvae(path: Path, train: np.ndarray, real: tuple[Table, Table], args: argparse.Namespace, seed: int):
    import pandas as pd
    from ctgan import TVAE

    frame = pd.read_csv(path).iloc[train].reset_index(drop=True)
    discrete = [c.name for c in real[0].columns if c.type in ("categorical", "boolean")]
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = TVAE(epochs=args.epochs, batch_size=args.batch_size, enable_gpu=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(frame, discrete_columns=discrete)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    synthetic = _from_frame(model.sample(len(train)), real[0])
    sample_s = time.perf_counter() - t1
    return fit_s, sample_s, fidelity_report(real[1], synthetic, real[0], seed=seed)


def run_turbovae(
    path: Path, train: np.ndarray, real: tuple[Table, Table], args: argparse.Namespace, seed: int
):
    flags = {
        "data.name": f"csv:{path}",
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.seed": seed,
        "train.threads": args.threads,
    }
    cfg = turbovae.resolve("tabular", flags=flags, overrides=args.override)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = turbovae.fit(cfg, out, progress=False)
        fit_s = time.perf_counter() - t0
        vae = turbovae.load(out)
    t1 = time.perf_counter()
    synthetic = synthesize(vae, len(train), generator=torch.Generator().manual_seed(seed))
    sample_s = time.perf_counter() - t1
    report = fidelity_report(real[1], synthetic, real[0], seed=seed)
    report["train_seconds"] = summary["train_seconds"]
    return fit_s, sample_s, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (0: torch's default)")
    p.add_argument("--only", choices=("tvae", "turbovae"), help="run one side only")
    p.add_argument("--json", help="also write every result to this file")
    p.add_argument("override", nargs="*", help="turbovae config overrides, e.g. train.lr=2e-3")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    path = next(f for f in export_tables(folder) if f.stem == "breast-cancer")
    table = read_table(path)
    train, test = split_indices(len(table), 0.1, 0)
    real = (table.take(train), table.take(test))
    runs: dict[str, list[dict[str, Any]]] = {"tvae": [], "turbovae": []}
    results = []
    floor = _measures(fidelity_report(real[1], real[0], real[0]))  # real training rows as "synthetic"
    for seed in range(args.repeats):
        for name, fn in (("tvae", run_tvae), ("turbovae", run_turbovae)):
            if args.only and name != args.only:
                continue
            fit_s, sample_s, report = fn(path, train, real, args, seed)
            row = {"model": name, "seed": seed, "fit_s": round(fit_s, 2), "sample_s": round(sample_s, 3),
                   **{k: round(v, 4) for k, v in _measures(report).items()},
                   "ml_real": round(report["ml_efficacy"]["real"], 4),
                   "load": round(os.getloadavg()[0], 2)}  # fmt: skip
            if "train_seconds" in report:
                row["train_s"] = round(report["train_seconds"], 2)
            print(json.dumps(row), flush=True)
            runs[name].append(row)
            results.append(row)
    print(f"\nbreast-cancer: {len(train)} training rows, {len(test)} held-out rows; epochs {args.epochs}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'':10} {'fit s (median)':>15} " + " ".join(f"{m:>12}" for m in MEASURES))
    print(f"{'real rows':10} {'':>15} " + " ".join(f"{floor[m]:12.3f}" for m in MEASURES))
    for name, rows in runs.items():
        if rows:
            fit = statistics.median(r["fit_s"] for r in rows)
            means = [statistics.mean(r[m] for r in rows) for m in MEASURES]
            print(f"{name:10} {fit:15.2f} " + " ".join(f"{v:12.3f}" for v in means))
    if runs["tvae"] and runs["turbovae"]:
        ratio = statistics.median(r["fit_s"] for r in runs["tvae"]) / statistics.median(
            r["fit_s"] for r in runs["turbovae"]
        )
        print(f"turbovae fits {ratio:.1f}× faster (median over {args.repeats} seeds)")
    if args.json:
        Path(args.json).write_text(json.dumps({"floor": floor, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
