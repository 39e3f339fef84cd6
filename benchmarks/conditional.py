"""The conditional-generation targets of issue 20, measured with the CLI's own commands.

1. ``fmnist``: a conditional and an unconditional MLP VAE (784-400-20, the ``fmnist-mlp`` preset,
   dynamically binarised, Bernoulli) trained on Fashion-MNIST the same way; a logistic regression
   (scikit-learn) trained on the real training images classifies 1,000 images generated per class
   (``sample --label``): the share recognised as the class asked for, averaged over the 10 classes,
   for the mean images E[x | z, y] and for binary draws x ~ p(x | z, y); the same classifier's accuracy
   on the real test images is the ceiling. Target: ≥ 80%.
   Also target 3: both runs' test NELBO (and IWAE) from summary.json: conditional −log p(x | y)
   against unconditional −log p(x) of the same model.
   ``defaults`` (issue 33): the same classifier and share for a run with ``--condition label`` and no
   other training option, on a labelled subset of ``--subset`` (8,000) Fashion-MNIST training images
   written as an ``.npz`` (x, y): mean images and binary draws at temperature 1. Target: ≥ 80%.
2. ``table``: scikit-learn's breast-cancer table with the malignant class subsampled to ``--rare``
   rows (≤ 10% of the rows), written as CSV; a run conditioned on ``diagnosis`` samples 1,000 rows
   with ``--where diagnosis=malignant``; an unconditional run of the same preset samples rows until
   1,000 are malignant. Mean KS (``evaluation.fidelity.ks_statistic``) over the 30 numeric columns
   against the real malignant rows: the conditional rows should be closer.

    python benchmarks/conditional.py --out runs/conditional            # both, ~10 min on one core
    python benchmarks/conditional.py --out runs/conditional --only table
    python benchmarks/conditional.py --out runs/conditional --only defaults  # ~1 min + the classifier

Prints one JSON object per part and writes them to OUT/results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from turbovae.cli import main as turbovae
from turbovae.data import load_dataset
from turbovae.data.tables import read_table
from turbovae.evaluation.fidelity import ks_statistic

THREADS = ["train.threads=1", "--progress", "off"]


def _train(args: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if turbovae(["train", *args, *THREADS]) != 0:
        raise SystemExit(f"turbovae train {' '.join(args)} failed")
    out = Path(args[args.index("--out") + 1])
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def _classifier(out: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(coefficients (10, 784), intercepts (10,), test accuracy, fit seconds) of the logistic regression
    on the real training images, cached as OUT/fmnist-logreg.npz (plain arrays: no pickle)."""
    cache = out / "fmnist-logreg.npz"
    if cache.is_file():
        saved = np.load(cache)
        return saved["coef"], saved["intercept"], float(saved["accuracy"]), float(saved["seconds"])
    from sklearn.linear_model import LogisticRegression

    data = load_dataset("fashion-mnist")
    assert data.y_train is not None and data.y_test is not None
    x_train = data.x_train.reshape(len(data.x_train), -1).numpy() / 255.0
    x_test = data.x_test.reshape(len(data.x_test), -1).numpy() / 255.0
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=200)
    clf.fit(x_train, data.y_train.numpy())
    seconds = time.perf_counter() - t0
    accuracy = float((clf.predict(x_test) == data.y_test.numpy()).mean())
    np.savez(cache, coef=clf.coef_, intercept=clf.intercept_, accuracy=accuracy, seconds=seconds)
    return clf.coef_, clf.intercept_, accuracy, seconds


def fmnist(
    out: Path, epochs: int, per_class: int, seed: int, temperatures: list[float], reuse: bool,
    overrides: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    common = ["--config", "fmnist-mlp", "--epochs", str(epochs), "--seed", str(seed), "--overwrite"]
    common += overrides or []  # KEY=VALUE config overrides for both runs
    runs = {"cond": out / "fmnist-cond", "plain": out / "fmnist-plain"}
    summaries = {}
    for name, run in runs.items():
        if reuse and (run / "summary.json").is_file():
            summaries[name] = json.loads((run / "summary.json").read_text())
        else:
            extra = ["--condition", "label"] if name == "cond" else []
            summaries[name] = _train([*common, *extra, "--out", str(run)])
    cond, plain = summaries["cond"], summaries["plain"]
    coef, intercept, ceiling, fit_seconds = _classifier(out)

    recognised: dict[str, list[float]] = {}
    for temperature in temperatures:
        for kind in ("mean", "draw"):
            key = f"{kind}_T{temperature:g}"
            recognised[key] = []
            for label in range(10):
                path = out / f"fmnist-cond-{label}-{key}.npy"
                argv = ["sample", str(runs["cond"]), "--label", str(label), "--n", str(per_class)]
                argv += ["--seed", str(seed + label), "--out", str(path), "--device", "cpu"]
                argv += ["--temperature", repr(temperature)] + (["--draw"] if kind == "draw" else [])
                if turbovae(argv) != 0:
                    raise SystemExit("turbovae sample failed")
                x = np.load(path).reshape(per_class, -1)
                predicted = (x @ coef.T + intercept).argmax(1)
                recognised[key].append(float((predicted == label).mean()))
                path.unlink()
    return {
        "part": "fmnist",
        "epochs": epochs,
        "overrides": overrides or [],
        "per_class": per_class,
        "classifier": "LogisticRegression(max_iter=200) on the 60,000 real training images / 255",
        "classifier_fit_seconds": fit_seconds,
        "classifier_test_accuracy (ceiling)": ceiling,
        "recognised": {k: float(np.mean(v)) for k, v in recognised.items()},
        "recognised_per_class": recognised,
        "classes": cond.get("classes"),
        "cond_test_nelbo": cond["test_nelbo"],
        "cond_test_nll_iwae": cond["test_nll_iwae"],
        "plain_test_nelbo": plain["test_nelbo"],
        "plain_test_nll_iwae": plain["test_nll_iwae"],
        "nelbo_gain_nats": plain["test_nelbo"] - cond["test_nelbo"],
        "cond_train_seconds": cond["train_seconds"],
        "plain_train_seconds": plain["train_seconds"],
    }


def defaults(out: Path, subset: int, per_class: int, seed: int) -> dict[str, Any]:
    data = load_dataset("fashion-mnist")
    assert data.y_train is not None
    pick = np.random.default_rng(seed).permutation(len(data.x_train))[:subset]
    npz = out / f"fmnist-{subset}.npz"
    np.savez(npz, x=data.x_train.numpy()[pick], y=data.y_train.numpy()[pick].astype(np.int64))
    run = out / "defaults"
    summary = _train(["--data", str(npz), "--condition", "label", "--out", str(run), "--overwrite"])
    coef, intercept, ceiling, _ = _classifier(out)
    import torch

    import turbovae

    vae = turbovae.load(run)
    recognised: dict[str, list[float]] = {"mean": [], "draw": []}
    for kind in recognised:
        for label in range(10):
            gen = torch.Generator().manual_seed(seed + label)
            x = vae.sample(per_class, gen, kind == "mean", condition=label)
            predicted = (x.reshape(per_class, -1).double().numpy() @ coef.T + intercept).argmax(1)
            recognised[kind].append(float((predicted == label).mean()))
    return {
        "part": "defaults",
        "subset": subset,
        "command": f"turbovae train --data {npz.name} --condition label (train.threads=1 --progress off)",
        "steps": summary.get("steps"),
        "classifier_test_accuracy (ceiling)": ceiling,
        "recognised": {k: float(np.mean(v)) for k, v in recognised.items()},
        "recognised_per_class": recognised,
        "test_nelbo": summary["test_nelbo"],
        "train_seconds": summary["train_seconds"],
    }


def rare_table(path: Path, rare: int, seed: int) -> tuple[int, int]:
    """breast cancer with ``rare`` malignant rows (of 212), as CSV; (rows, rare rows)."""
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    rng = np.random.default_rng(seed)
    malignant = np.flatnonzero(bc.target == 0)
    kept_malignant = rng.choice(malignant, rare, replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(bc.target == 1), kept_malignant]))
    names = [n.replace(" ", "_") for n in bc.feature_names]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, "diagnosis"])
        for i in keep:
            w.writerow([*(f"{v:.6g}" for v in bc.data[i]), "malignant" if bc.target[i] == 0 else "benign"])
    return len(keep), rare


def _mean_ks(real: Any, synth: Any) -> float:
    cols = [c.name for c in real.columns if c.type in ("continuous", "integer")]
    return float(np.mean([ks_statistic(real.column(c).values, synth.column(c).values) for c in cols]))


def table(out: Path, epochs: int, rare: int, n: int, seed: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "breast-cancer-rare.csv"
    rows, n_rare = rare_table(path, rare, seed)
    common = ["--data", f"csv:{path}", "--epochs", str(epochs), "--batch-size", "64", "--seed", str(seed)]
    common += ["--overwrite"]
    cond = _train([*common, "--condition", "diagnosis", "--out", str(out / "table-cond")])
    plain = _train([*common, "--out", str(out / "table-plain")])

    real = read_table(path)
    label = real.column("diagnosis").values
    real_rare = real.take(np.flatnonzero(label == "malignant"))

    where = out / "table-cond-malignant.csv"
    argv = ["sample", str(out / "table-cond"), "--where", "diagnosis=malignant", "--n", str(n)]
    if turbovae([*argv, "--seed", str(seed), "--out", str(where)]) != 0:
        raise SystemExit("turbovae sample --where failed")
    synth_cond = read_table(where)

    # unconditional rows until n are malignant (at most 200 n drawn)
    drawn, kept, total = 0, [], 0
    while total < n and drawn < 200 * n:
        batch = max(10 * n, 10_000)
        part = out / f"table-plain-{drawn}.csv"
        argv = ["sample", str(out / "table-plain"), "--n", str(batch), "--seed", str(seed + 1 + drawn)]
        if turbovae([*argv, "--out", str(part)]) != 0:
            raise SystemExit("turbovae sample failed")
        t = read_table(part)
        idx = np.flatnonzero(t.column("diagnosis").values == "malignant")
        kept.append(t.take(idx))
        total += len(idx)
        drawn += batch
    plain_share = total / drawn
    cols = kept[0].columns
    merged_values = {c.name: np.concatenate([k.column(c.name).values for k in kept])[:n] for c in cols}
    from turbovae.data.tables import Column, Table

    synth_plain = Table([Column(c.name, c.type, merged_values[c.name], c.decimals, c.tokens) for c in cols])
    return {
        "part": "table",
        "rows": rows,
        "rare_rows": n_rare,
        "rare_share": n_rare / rows,
        "epochs": epochs,
        "n": n,
        "cond_rows_all_malignant": bool((synth_cond.column("diagnosis").values == "malignant").all()),
        "cond_mean_ks": _mean_ks(real_rare, synth_cond),
        "plain_filtered_rows": min(total, n),
        "plain_drawn_rows": drawn,
        "plain_malignant_share": plain_share,
        "plain_filtered_mean_ks": _mean_ks(real_rare, synth_plain),
        "cond_seconds": cond["wall_seconds"],
        "plain_seconds": plain["wall_seconds"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/conditional")
    p.add_argument("--only", choices=["fmnist", "table", "defaults"])
    p.add_argument("--subset", type=int, default=8000, help="defaults: Fashion-MNIST images (default 8,000)")
    p.add_argument("--epochs", type=int, default=10, help="Fashion-MNIST epochs (default 10)")
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--table-epochs", type=int, default=300)
    p.add_argument("--rare", type=int, default=35, help="malignant rows kept (35 of 392 rows: 8.9%%)")
    p.add_argument("--n", type=int, default=1000, help="table rows sampled per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperatures", default="1,0.7,0.5", help="sampling temperatures for the classifier")
    p.add_argument("--train", default="", help="Fashion-MNIST config overrides, e.g. 'train.lr=3e-3'")
    p.add_argument("--reuse", action="store_true", help="keep finished Fashion-MNIST runs in OUT")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if a.only in (None, "table"):
        results.append(table(out, a.table_epochs, a.rare, a.n, a.seed))
        print(json.dumps(results[-1]), flush=True)
    if a.only in (None, "defaults"):
        results.append(defaults(out, a.subset, a.per_class, a.seed))
        print(json.dumps(results[-1]), flush=True)
    if a.only in (None, "fmnist"):
        temperatures = [float(t) for t in a.temperatures.split(",")]
        results.append(fmnist(out, a.epochs, a.per_class, a.seed, temperatures, a.reuse, a.train.split()))
        print(json.dumps(results[-1]), flush=True)
    (out / f"results{'-' + a.only if a.only else ''}.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
