"""Synthetic tables: how faithful the rows drawn from a trained tabular run (``synthesize``, which the
table kind owns: ``kinds/table.py``) are.

The measures compare synthetic rows with real ones that the model did not train on (the run's
held-out split, or ``--real FILE``), as ``turbovae eval RUN_DIR --fidelity`` reports them:

- per column: the Kolmogorov-Smirnov statistic (numbers, dates and times) or the total variation distance
  (categorical, boolean; missing counts as a category) between the real and synthetic marginals,
  0 for identical distributions, 1 for disjoint ones; and their means, ``mean_ks`` and ``mean_tv``;
- ``corr_mae``: the mean absolute difference between the real and synthetic Pearson correlations
  of every pair of numeric (continuous, integer, boolean) columns;
- ``ml_efficacy``: train on synthetic rows, test on real held-out rows, against the same models
  trained on the real training rows (scikit-learn's logistic/ridge regression and a random forest;
  macro F1 for a categorical target, R² for a numeric one);
- ``dcr``: the distance from each synthetic row to its closest real training row (numbers
  standardised, categories one-hot at distance 1), its median, and the share of exact copies; the
  same for real held-out rows as the yardstick (synthetic rows much closer than those are copies);
- ``sdmetrics``: SDMetrics' QualityReport score (column shapes, column pair trends) of the synthetic
  rows against the same real rows as the marginals (``quality.py``); None, with ``sdmetrics_missing``
  saying how to install it, when sdmetrics is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..data.tables import NUMERIC_TYPES, Column, Table
from ..errors import DataError
from .quality import INSTALL, sdmetrics_available, sdmetrics_quality

NUMERIC = NUMERIC_TYPES  # continuous, integer, and dates and times (as numbers)
# below this distance (in standard deviations) a row counts as a copy: the nearest-neighbour search
# computes |a − b| as sqrt(|a|² + |b|² − 2a·b), which leaves ~1e-7 where a = b
COPY_DISTANCE = 1e-6


# ---- marginals ---------------------------------------------------------------------------------------


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic sup |F_a − F_b| (NaNs ignored); 1 if a side is empty."""
    a, b = np.sort(a[~np.isnan(a)]), np.sort(b[~np.isnan(b)])
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else 1.0
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _labels(c: Column) -> np.ndarray:
    if c.type == "categorical":
        return np.array(["\0missing" if v is None else str(v) for v in c.values], dtype=object)
    return np.array(["\0missing" if math.isnan(v) else repr(float(v)) for v in c.values], dtype=object)


def total_variation(a: Column, b: Column) -> float:
    """½ Σ |p_a(v) − p_b(v)| over the values of two columns, missing counted as a value."""
    la, lb = _labels(a), _labels(b)
    values, inverse = np.unique(np.concatenate([la, lb]), return_inverse=True)
    pa = np.bincount(inverse[: len(la)], minlength=len(values)) / len(la)
    pb = np.bincount(inverse[len(la) :], minlength=len(values)) / len(lb)
    return float(0.5 * np.abs(pa - pb).sum())


def column_distances(real: Table, synthetic: Table) -> dict[str, dict[str, Any]]:
    """Per column of ``real``: ``ks`` (numeric) or ``tv`` (categorical, boolean), and missing shares."""
    out: dict[str, dict[str, Any]] = {}
    for r in real.columns:
        s = synthetic.column(r.name)
        entry: dict[str, Any] = {"type": r.type}
        if r.type in NUMERIC:
            entry["ks"] = ks_statistic(r.values, s.values)
        else:
            entry["tv"] = total_variation(r, s)
        r_missing, s_missing = float(r.missing.mean()), float(s.missing.mean())
        if r_missing or s_missing:
            entry.update(missing_real=r_missing, missing_synthetic=s_missing)
        out[r.name] = entry
    return out


# ---- joint structure ---------------------------------------------------------------------------------


def _numeric_columns(table: Table) -> list[Column]:
    return [c for c in table.columns if c.type in (*NUMERIC, "boolean")]


def _filled(values: np.ndarray) -> np.ndarray:
    """Missing values as the column mean (0 for an all-missing column)."""
    mean = np.nanmean(values) if (~np.isnan(values)).any() else 0.0
    return np.where(np.isnan(values), mean, values)


def _correlations(table: Table, names: list[str]) -> np.ndarray:
    m = np.stack([_filled(table.column(n).values.astype(np.float64)) for n in names], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(m, rowvar=False)
    return np.nan_to_num(np.atleast_2d(corr))  # a constant column correlates with nothing


def correlation_mae(real: Table, synthetic: Table) -> float | None:
    """Mean |ρ_real − ρ_synthetic| over the pairs of numeric and boolean columns (None if < 2)."""
    names = [c.name for c in _numeric_columns(real)]
    if len(names) < 2:
        return None
    upper = np.triu_indices(len(names), k=1)
    diff = _correlations(real, names)[upper] - _correlations(synthetic, names)[upper]
    return float(np.abs(diff).mean())


class _Encoder:
    """Rows as numeric features, fitted on reference rows: numbers standardised (missing: 0 and an
    indicator), categories one-hot scaled by 1/√2 (two different categories are at distance 1)."""

    def __init__(self, reference: Table, exclude: str | None = None) -> None:
        self.parts: list[tuple[str, str, Any]] = []
        for c in reference.columns:
            if c.name == exclude:
                continue
            if c.type == "categorical":
                cats = sorted({v for v in c.values if v is not None})
                self.parts.append((c.name, "onehot", {v: i for i, v in enumerate(cats)}))
            else:
                values = c.values[~np.isnan(c.values)]
                mean = float(values.mean()) if len(values) else 0.0
                std = float(values.std()) if len(values) else 1.0
                self.parts.append((c.name, "number", (mean, std or 1.0, bool(c.missing.any()))))

    def __call__(self, table: Table) -> np.ndarray:
        features: list[np.ndarray] = []
        for name, kind, info in self.parts:
            c = table.column(name)
            if kind == "onehot":
                block = np.zeros((len(table), len(info) + 1))  # the last: missing or unseen
                codes = [info.get(v, len(info)) if v is not None else len(info) for v in c.values]
                block[np.arange(len(table)), codes] = math.sqrt(0.5)
                features.append(block)
            else:
                mean, std, with_missing = info
                missing = np.isnan(c.values)
                features.append(np.where(missing, 0.0, (c.values - mean) / std)[:, None])
                if with_missing or missing.any():
                    features.append(missing[:, None].astype(np.float64))
        return np.concatenate(features, axis=1) if features else np.zeros((len(table), 0))


MAX_TARGET_CLASSES = 20  # a categorical column with more classes is not the default ML-efficacy target


def choose_target(table: Table, target: str | None = None) -> tuple[Column, str]:
    """The column ML efficacy predicts, and why: ``target`` if given; else the last categorical or
    boolean column with 2 to MAX_TARGET_CLASSES classes (a label, usually the last column of a
    dataset); else the last numeric column (a regression); else the last column."""
    if target is not None:
        try:
            return table.column(target), "given by --target"
        except KeyError:
            raise DataError(
                f"--target: the table has no column '{target}' (columns: {', '.join(table.names)})"
            ) from None
    for c in reversed(table.columns):
        if c.type in ("categorical", "boolean"):
            classes = len({v for v, m in zip(_labels(c), c.missing, strict=True) if not m})
            if 2 <= classes <= MAX_TARGET_CLASSES:
                return (
                    c,
                    f"the last categorical column with 2-{MAX_TARGET_CLASSES} classes (it has {classes})",
                )
    for c in reversed(table.columns):
        if c.type in NUMERIC:
            return c, f"the last numeric column (no categorical one has 2-{MAX_TARGET_CLASSES} classes)"
    return table.columns[-1], "the last column"


def _labels_of(c: Column) -> tuple[np.ndarray, np.ndarray]:
    """(target values, rows where the target is present)."""
    present = ~c.missing
    if c.type in NUMERIC:
        return c.values.astype(np.float64), present
    return _labels(c), present


def ml_efficacy(
    real_test: Table,
    synthetic: Table,
    real_train: Table | None = None,
    *,
    target: str | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Train on synthetic rows, test on real held-out rows; the same models trained on the real
    training rows give the reference. Returns None when the table has a single column."""
    from sklearn.base import clone
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import f1_score, r2_score

    if len(real_test.columns) < 2:
        return None
    reference = real_train if real_train is not None else real_test
    column, why = choose_target(reference, target)
    column = real_test.column(column.name)
    classification = column.type not in NUMERIC
    encoder = _Encoder(real_train if real_train is not None else real_test, exclude=column.name)
    models: dict[str, Any] = (
        {
            "logistic_regression": LogisticRegression(max_iter=2000),
            "random_forest": RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1),
        }
        if classification
        else {
            "ridge": Ridge(),
            "random_forest": RandomForestRegressor(n_estimators=100, random_state=seed, n_jobs=1),
        }
    )
    y_test, keep_test = _labels_of(column)
    x_test, y_test = encoder(real_test)[keep_test], y_test[keep_test]

    def score(train: Table, model: Any) -> float:
        y, keep = _labels_of(train.column(column.name))
        x, y = encoder(train)[keep], y[keep]
        if len(y) == 0:
            return 0.0 if classification else -1.0
        if classification and len(set(y.tolist())) < 2:  # one class only: the model is that constant
            predicted = np.full(len(y_test), y[0], dtype=object)
        else:
            predicted = clone(model).fit(x, y).predict(x_test)
        if classification:
            return float(f1_score(y_test.astype(str), predicted.astype(str), average="macro"))
        return float(r2_score(y_test, predicted))

    result: dict[str, Any] = {"models": {}}
    for name, model in models.items():
        entry = {"synthetic": score(synthetic, model)}
        if real_train is not None:
            entry["real"] = score(real_train, model)
        result["models"][name] = entry
    synthetic_mean = float(np.mean([m["synthetic"] for m in result["models"].values()]))
    real_mean = float(np.mean([m["real"] for m in result["models"].values()])) if real_train else None
    return {
        "target": column.name,
        "target_rule": why,
        "task": "classification" if classification else "regression",
        "metric": "macro_f1" if classification else "r2",
        "synthetic": synthetic_mean,
        "real": real_mean,
        "ratio": synthetic_mean / real_mean if real_mean else None,
        **result,
    }


def _nearest(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=1).fit(reference)
    return index.kneighbors(queries, return_distance=True)[0][:, 0]


def distance_to_closest_record(
    real_train: Table, synthetic: Table, real_test: Table | None = None
) -> dict[str, Any]:
    """Distances from each synthetic row to its closest real training row (and, as the yardstick,
    from each real held-out row to its closest training row)."""
    encoder = _Encoder(real_train)
    reference = encoder(real_train)
    d = _nearest(reference, encoder(synthetic))
    out: dict[str, Any] = {
        "median": float(np.median(d)),
        "p05": float(np.percentile(d, 5)),
        "exact_copies": float((d < COPY_DISTANCE).mean()),
    }
    if real_test is not None:
        h = _nearest(reference, encoder(real_test))
        out.update(holdout_median=float(np.median(h)), holdout_p05=float(np.percentile(h, 5)))
    return out


def fidelity_report(
    real_test: Table,
    synthetic: Table,
    real_train: Table | None = None,
    *,
    target: str | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    judge: bool = True,
) -> dict[str, Any]:
    """Every measure of the module in one JSON-serialisable dict (see the module docstring);
    ``progress`` is called with 1 after each of its ``REPORT_STAGES`` stages. ``judge=False`` leaves
    SDMetrics' score out (seconds on a table of 30 columns: it scores every pair)."""
    step = progress or (lambda n: None)
    columns = column_distances(real_test, synthetic)
    ks = [c["ks"] for c in columns.values() if "ks" in c]
    tv = [c["tv"] for c in columns.values() if "tv" in c]
    report: dict[str, Any] = {
        "n_real": len(real_test),
        "n_synthetic": len(synthetic),
        "n_train": len(real_train) if real_train is not None else None,
        "mean_ks": float(np.mean(ks)) if ks else None,
        "mean_tv": float(np.mean(tv)) if tv else None,
        "corr_mae": correlation_mae(real_test, synthetic),
    }
    step(1)
    report["ml_efficacy"] = ml_efficacy(real_test, synthetic, real_train, target=target, seed=seed)
    step(1)
    if real_train is not None:
        report["dcr"] = distance_to_closest_record(real_train, synthetic, real_test)
    else:
        report["dcr"] = distance_to_closest_record(real_test, synthetic)
    step(1)
    report["sdmetrics"] = sdmetrics_quality(real_test, synthetic) if judge and sdmetrics_available() else None
    if judge and report["sdmetrics"] is None:
        report["sdmetrics_missing"] = INSTALL
    step(1)
    report["columns"] = columns
    return report


REPORT_STAGES = 4  # of fidelity_report: marginals and correlations, ML efficacy, distances, SDMetrics
