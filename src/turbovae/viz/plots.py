"""Plots (matplotlib, headless): training curves, KL per latent dimension, a 2-d map of the latents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIGURE_SIZE = (6.4, 4.0)  # inches; at FIGURE_DPI this is 960 × 600 pixels


FIGURE_DPI = 150


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
            "figure.dpi": FIGURE_DPI,
            "savefig.dpi": FIGURE_DPI,
        }
    )
    return plt


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png", dpi=FIGURE_DPI)  # no bbox_inches: the size is the figure's
    plt.close(fig)


def _series(events: list[dict[str, Any]], event: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in events:
        if e.get("event") == event and isinstance(e.get(key), int | float) and "epoch" in e:
            xs.append(float(e["epoch"]))
            ys.append(float(e[key]))
    return xs, ys


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], out_dir: Path) -> dict[str, Path]:
    """Loss, KL, learning-rate and samples/s over training (x: epoch), one line per run and series.

    Returns {stem: path} of the PNGs written (FIGURE_SIZE × FIGURE_DPI pixels each); a curve with no
    data in any run still gets a figure that says so."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = {}
    for stem, title, ylabel, series, log_y in CURVES:
        fig, ax = plt.subplots(figsize=FIGURE_SIZE)
        drawn = 0
        for r, (name, events) in enumerate(runs):
            for event, key, label, style in series:
                xs, ys = _series(events, event, key)
                if not xs:
                    continue
                full = label if len(runs) == 1 else f"{name}: {label}"
                marker = "o" if event == "eval" and len(xs) < 30 else None
                colour = colours[r % len(colours)]
                ax.plot(xs, ys, style, color=colour, label=full, marker=marker, ms=3, lw=1.5)
                drawn += 1
        if drawn == 0:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        if log_y and drawn:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if drawn > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        _save_figure(fig, path)
        written[stem] = path
    return written


def plot_kl_per_dim(
    kl: Sequence[float], mean_variance: Sequence[float], threshold: float, path: Path, title: str = ""
) -> None:
    """Two panels over the latent dimensions: the average KL per dimension (nats) and Burda's activity
    Cov_x(E_q[z_u]) on a log scale with the threshold; active dimensions in colour."""
    plt = _pyplot()
    kl_a, var_a = np.asarray(kl, dtype=float), np.maximum(np.asarray(mean_variance, dtype=float), 1e-12)
    dims = np.arange(len(kl_a))
    active = var_a > threshold
    colour = np.where(active, "#1f77b4", "#c7c7c7")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=FIGURE_SIZE, sharex=True)
    ax1.bar(dims, kl_a, color=colour)
    ax1.set_ylabel("KL (nats)")
    ax1.set_title(title or f"KL per latent dimension ({int(active.sum())} of {len(kl_a)} units active)")
    ax2.bar(dims, var_a, color=colour)
    ax2.axhline(threshold, color="#d62728", lw=1, ls="--")
    ax2.set_yscale("log")
    ax2.set_ylabel("Cov$_x$(E$_q$[z$_u$])")
    ax2.set_xlabel("latent dimension u")
    ax2.set_title(f"activity; dashed: the threshold {threshold:g} (active above, in colour)", fontsize=9,
                  fontweight="normal", loc="left")  # fmt: skip
    if len(dims) <= 40:
        ax2.set_xticks(dims)
        ax2.tick_params(axis="x", labelsize=7 if len(dims) > 20 else 9)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_latent_map(
    means: np.ndarray, labels: np.ndarray | None, path: Path, class_names: Sequence[str] | None = None
) -> str:
    """Scatter of posterior means in 2-D (the first two principal components when the latent has more
    than two dimensions), coloured by label when there are labels. Returns how the axes were made."""
    plt = _pyplot()
    means = np.asarray(means, dtype=np.float64)
    if means.shape[1] == 1:
        points = np.concatenate([means, np.zeros_like(means)], axis=1)
        axes, how = ("z₁", ""), "the single latent dimension"
    elif means.shape[1] == 2:
        points, axes, how = means, ("z₁", "z₂"), "the two latent dimensions"
    else:
        centred = means - means.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[:2].T
        share = s**2 / max(float((s**2).sum()), 1e-30)
        axes = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
        how = "the first two principal components of the posterior means"
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    size = 4 if len(points) > 2000 else 10
    if labels is not None and len(labels) == len(points):
        classes = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "viridis")
        for i, c in enumerate(classes):
            sel = labels == c
            name = class_names[int(c)] if class_names and 0 <= int(c) < len(class_names) else str(c)
            colour = cmap(i % 10) if len(classes) <= 10 else cmap(i / max(len(classes) - 1, 1))
            ax.scatter(points[sel, 0], points[sel, 1], s=size, color=colour, label=name, alpha=0.7, lw=0)
        if len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax.scatter(points[:, 0], points[:, 1], s=size, color="#1f77b4", alpha=0.6, lw=0)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1] or "")
    ax.set_title(f"Posterior means of {len(points):,} test examples")
    fig.tight_layout()
    _save_figure(fig, path)
    return how


# (file stem, title, y-axis label, [(event, key, line label, style)], log y)
CURVES: list[tuple[str, str, str, list[tuple[str, str, str, str]], bool]] = [
    (
        "curve_loss",
        "Loss",
        "nats per example",
        # runs from before the validation split evaluated each epoch on the test split
        [
            ("train", "loss", "train loss", "-"),
            ("eval", "val_nelbo", "validation NELBO", "--"),
            ("eval", "test_nelbo", "test NELBO", ":"),
        ],
        False,
    ),
    (
        "curve_kl",
        "KL(q(z|x) ‖ p(z))",
        "nats per example",
        [
            ("train", "kl", "train KL", "-"),
            ("eval", "val_kl", "validation KL", "--"),
            ("eval", "test_kl", "test KL", ":"),
        ],
        False,
    ),
    ("curve_lr", "Learning rate", "learning rate", [("train", "lr", "learning rate", "-")], True),
    (
        "curve_speed",
        "Training throughput",
        "samples / s",
        [("train", "samples_per_second", "samples / s", "-")],
        False,
    ),
]


MAX_HISTOGRAM_COLUMNS = 24  # small multiples in the report's histogram figure
MAX_BARS = 12  # categories shown per categorical column (the most frequent real ones)


def plot_column_histograms(real: Any, synthetic: Any, path: Path) -> Path:
    """Per-column marginals of real rows against synthetic ones (``data.tables.Table`` both): overlaid
    histograms on shared bins for numeric columns, side-by-side bars of the category shares
    (missing counted as a category) for categorical and boolean ones. At most
    MAX_HISTOGRAM_COLUMNS columns, in the table's order."""
    plt = _pyplot()
    columns = real.columns[:MAX_HISTOGRAM_COLUMNS]
    ncol = min(4, len(columns))
    nrow = -(-len(columns) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.3 * nrow + 0.5), squeeze=False)
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    for ax, col in zip(axes.flat, columns, strict=False):
        fake = synthetic.column(col.name)
        ax.set_title(col.name if len(col.name) <= 28 else col.name[:27] + "…", fontsize=9)
        ax.tick_params(labelsize=7)
        if col.type not in ("categorical", "boolean"):  # numbers, dates and times
            a, b = col.values[~np.isnan(col.values)], fake.values[~np.isnan(fake.values)]
            both = np.concatenate([a, b])
            if len(both) == 0:
                continue
            edges = np.histogram_bin_edges(both, bins=min(30, max(5, len(np.unique(both)))))
            ax.hist(a, bins=edges, density=True, alpha=0.55, color="#2f5fb3", label="real")
            ax.hist(b, bins=edges, density=True, histtype="step", linewidth=1.4, color="#c0392b",
                    label="synthetic")  # fmt: skip
        else:

            def labels(c: Any) -> list[str]:
                if c.type == "categorical":
                    return ["(missing)" if v is None else str(v) for v in c.values]
                false, true = c.tokens
                return ["(missing)" if np.isnan(v) else (true if v else false) for v in c.values]

            ra, sa = labels(col), labels(fake)
            names, counts = np.unique(ra, return_counts=True)
            keep = [str(n) for n in names[np.argsort(-counts, kind="stable")][:MAX_BARS]]
            pos = np.arange(len(keep))
            share_r = [ra.count(k) / max(len(ra), 1) for k in keep]
            share_s = [sa.count(k) / max(len(sa), 1) for k in keep]
            ax.bar(pos - 0.2, share_r, width=0.4, color="#2f5fb3", alpha=0.7, label="real")
            ax.bar(pos + 0.2, share_s, width=0.4, color="#c0392b", alpha=0.7, label="synthetic")
            ax.set_xticks(pos, [k if len(k) <= 10 else k[:9] + "…" for k in keep], rotation=45, ha="right")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    return path
